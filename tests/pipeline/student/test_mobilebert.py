"""MobileBERT (issue 13): the student `kdcache init-student --architecture mobilebert` builds
(kdcache.pipeline.student.mobilebert), its feature-map and attention transfer losses (losses.py, the
fmt / fmt_mean / fmt_var / at terms), and the knowledge-transfer phases (phases.py and the trainer's
phase loop): progressive freezes the layers below, resumes mid-phase exactly, reads only its columns.

The tiny random BERT of `tests.support.make_teacher` has near-identity layers (init std 0.02: layer l's
output is layer l - 1's to 1e-4 in the feature-map MSE), which would leave a layer phase nothing to
learn; the fixture scales its encoder matrices by 5 so that every teacher layer transforms its input.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcache.pipeline.cli.main import main
from kdcache.pipeline.student import losses as L
from kdcache.pipeline.student.config import load_train_config
from kdcache.pipeline.student.phases import build_phases, layer_group
from kdcache.pipeline.student.terms import TERMS, CompositeLoss, LossSpec
from kdcache.pipeline.student.trainer import train, validate
from kdcache.pipeline.student.trainer.plan import CompatibilityError
from tests.support import make_teacher, run_metrics, tiny_corpus

BATCH = 4
PHASE = 15  # steps per progressive phase: one epoch of the 60-row cache at batch 4
LAYERS, HIDDEN, HEADS = 3, 32, 4  # the teacher
BASE_COLUMNS = ["sample_id", "length", "input_ids"]


def _sharpen(teacher: str, scale: float) -> None:
    """Scale the teacher's encoder matrices in place, so that its layers do more than pass their input on."""
    from transformers import BertModel

    model = BertModel.from_pretrained(teacher)
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(teacher)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 3-layer encoder teacher (kept: the init-student tests read it), a cache of every hidden state and
    attention map, one without layer 3's attention, and a MobileBERT student (bottleneck 16, 2 FFNs, E 16)."""
    from kdcache.pipeline.student.mobilebert import init_mobilebert_student
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    root = tmp_path_factory.mktemp("mobilebert")
    teacher = make_teacher(root / "teacher", "encoder", layers=LAYERS, hidden=HIDDEN, heads=HEADS)
    _sharpen(teacher, 5.0)
    corpus = tiny_corpus(root / "corpus.jsonl", docs=30)
    common = dict(teacher=teacher, corpus=[corpus], max_length=16, batch_size=8, shard_tokens=16 * 12,
                  progress=False, top_k=0, hidden_layers="all")
    for name, attention in (("cache", "all"), ("cache_no_attn3", "1,2")):
        run_cache_pass(CacheConfig(out=str(root / name), attention_layers=attention, **common), executor="local",
                       log=lambda *_: None)
    init_mobilebert_student(teacher, root / "student", bottleneck=16, ffn_stack=2, embedding_size=16)
    return root


def _cfg(root: Path, out: str, cache: str = "cache", overrides=(), **flags):
    base = {"cache": str(root / cache), "student": str(root / "student"), "out": str(root / out),
            "batch_size": BATCH, "progress": False, "no_ray": True, **flags}
    return load_train_config("mobilebert", None, base, ["warmup_ratio=0", "lr=5e-3", *overrides])


def _init(root: Path, out: Path, *argv: str) -> int:
    return main(["init-student", "--architecture", "mobilebert", "--teacher", str(root / "teacher"), "--out", str(out),
                 *argv])


def _teacher_word_table(root: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(root / "teacher" / "model.safetensors"))["embeddings.word_embeddings.weight"].float()


# --------------------------------------------------------------------------------------------- #
# the student: kdcache init-student --architecture mobilebert
# --------------------------------------------------------------------------------------------- #


def test_init_student_builds_a_mobilebert_as_deep_and_wide_as_its_teacher(setup, tmp_path, capsys):
    from transformers import AutoConfig, AutoModel, MobileBertModel

    out = tmp_path / "mb"
    assert _init(setup, out, "--bottleneck", "16", "--ffn-stack", "3", "--embedding-size", "8",
                 "--intermediate-size", "24", "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["init_kwargs"] == {"add_pooling_layer": False}  # how kdcache loads it: no pooler to train
    student = AutoModel.from_pretrained(str(out), **record["init_kwargs"]).eval()
    assert isinstance(student, MobileBertModel)
    c, t = student.config, AutoConfig.from_pretrained(str(setup / "teacher"))
    assert (c.intra_bottleneck_size, c.true_hidden_size, c.num_feedforward_networks, c.embedding_size,
            c.intermediate_size) == (16, 16, 3, 8, 24)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (t.hidden_size, t.num_hidden_layers, HEADS)
    assert record["params"] == sum(p.numel() for p in student.parameters())

    ids = torch.randint(5, c.vocab_size, (2, 7))
    with torch.no_grad():
        hs = student(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    assert len(hs) == LAYERS + 1 and all(h.shape == (2, 7, HIDDEN) for h in hs)  # the teacher's width, every layer

    meta = json.loads((out / "kdcache_student.json").read_text())
    assert meta == record
    assert meta["hidden_layer_map"] == [[i, i] for i in range(LAYERS + 1)]
    assert (meta["num_heads"], meta["attention_head_groups"]) == (HEADS, 1)


def test_token_table_is_the_teachers_pca_projection(setup, tmp_path, capsys):
    from transformers import AutoModel

    from kdcache.pipeline.student.models import pca_projection

    assert _init(setup, tmp_path / "mb", "--bottleneck", "16", "--embedding-size", "8") == 0
    table = AutoModel.from_pretrained(str(tmp_path / "mb")).embeddings.word_embeddings.weight.detach()
    word = _teacher_word_table(setup)
    assert table.shape == (word.shape[0], 8)
    torch.testing.assert_close(table, word @ pca_projection(word, 8))
    # independently of SVD signs: the rows' Gram matrix is the teacher's seen through the projector onto
    # the top-8 eigenvectors of its (centred) covariance
    centred = (word - word.mean(0)).double()
    top = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -8:]
    w = word.double()
    torch.testing.assert_close((table.double() @ table.double().T), w @ top @ top.T @ w.T, atol=1e-4, rtol=1e-4)


def test_a_full_width_token_table_starts_at_the_teachers_embedding_output(setup, tmp_path):
    """embedding_size = the teacher's width: P is a rotation, the embedding transformation undoes it, so the
    student's hidden state 0 is the teacher's up to NoNorm's scale (feature-map MSE 0 before training)."""
    from transformers import AutoModel, BertModel

    assert _init(setup, tmp_path / "mb", "--bottleneck", "16", "--embedding-size", str(HIDDEN)) == 0
    student = AutoModel.from_pretrained(str(tmp_path / "mb"), add_pooling_layer=False).eval()
    teacher = BertModel.from_pretrained(str(setup / "teacher")).eval()
    ids = torch.randint(5, student.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        s0 = student(ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
        t0 = teacher(ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
    assert L.feature_map_losses(s0, t0, mask)[0].item() < 1e-5
    narrow = AutoModel.from_pretrained(str(setup / "student"), add_pooling_layer=False).eval()  # E = 16
    with torch.no_grad():
        n0 = narrow(ids, attention_mask=mask, output_hidden_states=True).hidden_states[0]
    assert L.feature_map_losses(n0, t0, mask)[0].item() > 1e-3  # half the directions dropped: not exact


def test_default_heads_are_the_largest_divisor_of_teacher_heads_and_bottleneck(setup, tmp_path, capsys):
    from transformers import AutoModel

    from kdcache.pipeline.student.mobilebert import default_heads

    assert [default_heads(4, 16), default_heads(4, 10), default_heads(4, 7), default_heads(12, 128)] == [4, 2, 1, 4]
    # 4 teacher heads do not divide a bottleneck of 10; 2 do
    assert _init(setup, tmp_path / "mb", "--bottleneck", "10", "--embedding-size", "8", "--json") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["num_heads"], record["attention_head_groups"]) == (2, 2)
    student = AutoModel.from_pretrained(str(tmp_path / "mb"), attn_implementation="eager").eval()
    ids = torch.randint(5, student.config.vocab_size, (1, 6))
    with torch.no_grad():
        att = student(ids, output_attentions=True).attentions
    assert len(att) == LAYERS and att[0].shape == (1, 2, 6, 6)


@pytest.mark.parametrize("argv, message", [
    (["--bottleneck", "12", "--num-heads", "3"], "--num-heads 3 does not divide the teacher's 4 heads"),
    (["--bottleneck", "10", "--num-heads", "4"], "--num-heads 4 does not divide --bottleneck 10"),
    (["--bottleneck", "64"], "--bottleneck 64 and --embedding-size 8 must not exceed the teacher's hidden size 32"),
    (["--num-layers", "2"], "--num-layers: not for a MobileBERT student"),
])
def test_bad_student_shapes_are_refused_clearly(setup, tmp_path, capsys, argv, message):
    assert _init(setup, tmp_path / "mb", "--embedding-size", "8", *argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mb" / "config.json").exists()


# --------------------------------------------------------------------------------------------- #
# the losses: feature-map transfer (fmt, fmt_mean, fmt_var) and attention transfer (at)
# --------------------------------------------------------------------------------------------- #

B, T, H = 2, 5, 6
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # the second row has 2 padded positions
PAD = ~MASK.bool()


def _attention(heads: int, seed: int) -> torch.Tensor:
    """Softmax rows over the real keys (0 on padded keys), as a student or the cache gives them."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, heads, T, T, generator=g).masked_fill(PAD[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


def _fd_check(f, x: torch.Tensor, eps: float, atol: float) -> None:
    """Autograd gradient of the scalar f at x against central finite differences in every coordinate
    (float32: the losses compute in float32, so float64 gradcheck cannot be used)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    fd = torch.zeros_like(x)
    for i in range(x.numel()):
        xp, xm = x.detach().clone(), x.detach().clone()
        xp.view(-1)[i] += eps
        xm.view(-1)[i] -= eps
        fd.view(-1)[i] = (f(xp) - f(xm)) / (2 * eps)
    torch.testing.assert_close(grad, fd, atol=atol, rtol=1e-2)


def test_feature_map_losses_are_zero_at_the_teacher_and_match_their_definitions():
    torch.manual_seed(0)
    s, t = torch.randn(B, T, H), 3 * torch.randn(B, T, H) + 1
    assert all(v.item() == 0.0 for v in L.feature_map_losses(t.clone(), t, MASK))
    mse, mean, var = L.feature_map_losses(s, t, MASK)
    real = MASK.bool()
    ln = lambda x: torch.nn.functional.layer_norm(x, (H,), eps=1e-5)  # noqa: E731
    assert mse.item() == pytest.approx(((ln(s) - ln(t)) ** 2).mean(-1)[real].mean().item(), rel=1e-5)
    assert mean.item() == pytest.approx(((s.mean(-1) - t.mean(-1)) ** 2)[real].mean().item(), rel=1e-5)
    var_s, var_t = s.var(-1, unbiased=False), t.var(-1, unbiased=False)
    assert var.item() == pytest.approx((var_s - var_t).abs()[real].mean().item(), rel=1e-5)
    # the main term ignores each token's scale and shift, which the two statistics terms match
    rescaled = L.feature_map_losses(2 * t - 1, t, MASK)
    assert rescaled[0].item() < 1e-6 < rescaled[2].item()


def test_attention_transfer_is_zero_at_the_teacher_and_is_the_kl_per_head_and_real_query():
    s, t = _attention(HEADS, 1), _attention(HEADS, 2)
    assert L.attention_transfer_loss(t.clone(), t, MASK).item() == pytest.approx(0.0, abs=1e-6)
    pair = MASK.bool()[:, None, :, None] & MASK.bool()[:, None, None, :]
    kl = torch.where(pair, torch.xlogy(t, t) - t * s.clamp(min=1e-12).log(), 0.0).sum(-1)  # [B, heads, T]
    real_rows = MASK.bool()[:, None, :].expand(-1, HEADS, -1)
    assert L.attention_transfer_loss(s, t, MASK).item() == pytest.approx(kl[real_rows].mean().item(), rel=1e-5)
    # a cached row that is not quite a distribution (uint8 / fp16) is renormalised over the real keys
    assert L.attention_transfer_loss(s, 0.9 * t, MASK).item() == pytest.approx(
        L.attention_transfer_loss(s, t, MASK).item(), rel=1e-5)


def test_registered_terms_are_zero_when_the_student_reproduces_the_cache():
    from kdcache.pipeline.student.trainer.adapter import StudentOutputs

    torch.manual_seed(0)
    spec = LossSpec(weights={"fmt": 1.0, "fmt_mean": 1.0, "fmt_var": 1.0, "at": 1.0},
                    layer_map=[(0, 0), (1, 1), (2, 2)])
    assert TERMS["fmt"].columns(spec) == {"hidden_0", "hidden_1", "hidden_2"}
    assert TERMS["at"].columns(spec) == {"attention_1", "attention_2"}
    hidden = [torch.randn(B, T, H) for _ in range(3)]
    att = [_attention(HEADS, i) for i in range(2)]
    batch = {"attention_mask": MASK, **{f"hidden_{i}": h.clone() for i, h in enumerate(hidden)},
             **{f"attention_{i + 1}": a.clone() for i, a in enumerate(att)}}
    outputs = StudentOutputs(hidden_states=tuple(hidden), attentions=tuple(att))
    loss = CompositeLoss(spec, None, None)
    total, parts = loss(outputs, batch)
    assert set(parts) == {"fmt", "fmt_mean", "fmt_var", "at"}
    assert total.item() == pytest.approx(0.0, abs=1e-5) and all(v.item() == pytest.approx(0.0, abs=1e-5)
                                                                 for v in parts.values())
    # a teacher layer that differs shows up in its own terms, once (summed over pairs)
    batch["hidden_1"] = 2 * hidden[1] + torch.randn(B, T, H)
    batch["attention_2"] = _attention(HEADS, 7)
    _, parts = loss(outputs, batch)
    for i, name in enumerate(("fmt", "fmt_mean", "fmt_var")):
        assert parts[name].item() == pytest.approx(L.feature_map_losses(hidden[1], batch["hidden_1"], MASK)[i].item(),
                                                   rel=1e-5, abs=1e-6)
    assert parts["at"].item() == pytest.approx(L.attention_transfer_loss(att[1], batch["attention_2"], MASK).item(),
                                               rel=1e-5)
    assert parts["fmt"].item() > 0.01 and parts["at"].item() > 0.01


@pytest.mark.parametrize("part", [0, 1, 2])
def test_feature_map_gradients_match_finite_differences(part):
    torch.manual_seed(part)
    s, t = torch.randn(B, T, H), 3 * torch.randn(B, T, H) + 1  # var_s far from var_t: |.| is smooth there
    _fd_check(lambda x: L.feature_map_losses(x, t, MASK)[part], s, eps=1e-2, atol=2e-4)


def test_attention_transfer_gradient_matches_finite_differences():
    s, t = _attention(2, 3) * 0.8 + 0.05, _attention(HEADS, 4)  # positive entries: log s is smooth
    _fd_check(lambda x: L.attention_transfer_loss(x, t, MASK), s, eps=1e-3, atol=2e-3)


def test_padded_positions_do_not_contribute():
    torch.manual_seed(0)
    s, t = torch.randn(B, T, H), 3 * torch.randn(B, T, H)
    s2, t2 = s.clone(), t.clone()
    s2[PAD], t2[PAD] = 100 * torch.randn(int(PAD.sum()), H), float("nan")

    def fmt_and_grad(student, teacher):
        x = student.clone().requires_grad_(True)
        values = L.feature_map_losses(x, teacher, MASK)
        (g,) = torch.autograd.grad(sum(values), x)
        return torch.stack(values), g

    (v1, g1), (v2, g2) = fmt_and_grad(s, t), fmt_and_grad(s2, t2)
    assert torch.equal(v1, v2) and torch.equal(g1[~PAD], g2[~PAD]) and not g2[PAD].any()

    sa, ta = _attention(2, 5), _attention(HEADS, 6)
    sa2, ta2 = sa.clone(), ta.clone()
    pad_q = PAD[:, None, :, None].expand_as(sa2)  # padded query rows ...
    pad_k = PAD[:, None, None, :].expand_as(sa2)  # ... and padded key columns
    sa2[pad_q | pad_k] = torch.rand(int((pad_q | pad_k).sum()))
    ta2[(PAD[:, None, :, None] | PAD[:, None, None, :]).expand_as(ta2)] = float("nan")

    def at_and_grad(student, teacher):
        x = student.clone().requires_grad_(True)
        value = L.attention_transfer_loss(x, teacher, MASK)
        return value, torch.autograd.grad(value, x)[0]

    (a1, h1), (a2, h2) = at_and_grad(sa, ta), at_and_grad(sa2, ta2)
    assert torch.equal(a1, a2) and a1.item() > 0
    assert torch.equal(h1[~(pad_q | pad_k)], h2[~(pad_q | pad_k)]) and not h2[pad_q | pad_k].any()


def test_student_head_h_is_compared_with_the_mean_of_teacher_heads_2h_and_2h_plus_1():
    s, t = _attention(2, 8), _attention(2 * 2, 9)
    pairs = torch.stack([(t[:, 0] + t[:, 1]) / 2, (t[:, 2] + t[:, 3]) / 2], 1)
    interleaved = torch.stack([(t[:, 0] + t[:, 2]) / 2, (t[:, 1] + t[:, 3]) / 2], 1)
    grouped = L.attention_transfer_loss(s, t, MASK).item()
    assert grouped == pytest.approx(L.attention_transfer_loss(s, pairs, MASK).item(), rel=1e-6)
    assert grouped != pytest.approx(L.attention_transfer_loss(s, interleaved, MASK).item(), rel=1e-3)
    with pytest.raises(ValueError, match="student's 3 heads do not divide the teacher's 4"):
        L.attention_transfer_loss(_attention(3, 1), t, MASK)


# --------------------------------------------------------------------------------------------- #
# knowledge transfer: progressive, joint, auxiliary
# --------------------------------------------------------------------------------------------- #


def _progressive(root: Path, out: str, overrides=()):
    return _cfg(root, out, steps=(LAYERS + 1) * PHASE, overrides=["keep_checkpoints=0", *overrides])


@pytest.fixture(scope="module")
def progressive_run(setup):
    """A progressive run of one phase per layer (embeddings, layers 1-3), a checkpoint at each phase's end."""
    train(_progressive(setup, "progressive", [f"checkpoint_every={PHASE}"]), log=lambda *_: None)
    return setup / "progressive"


def _initial(root: Path) -> dict[str, torch.Tensor]:
    """The student's weights before training, by HFStudent's names (what a checkpoint's model.pt holds)."""
    from safetensors.torch import load_file

    return {f"model.{k}": v for k, v in load_file(str(root / "student" / "model.safetensors")).items()}


def _checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / f"step-{step:08d}" / "model.pt")


def _states(root: Path, run: Path) -> list[dict[str, torch.Tensor]]:
    """The student's weights before the run, then at the end of every phase."""
    return [_initial(root), *(_checkpoint(run, PHASE * (i + 1)) for i in range(LAYERS + 1))]


def _changed_groups(before: dict, after: dict) -> set[int | None]:
    return {layer_group(k) for k in before if not torch.equal(before[k], after[k])}


def test_progressive_plan_has_one_phase_per_layer_reading_only_its_columns(setup):
    phases = validate(_progressive(setup, "plan"))["knowledge_transfer"]
    assert [p["name"] for p in phases] == ["embeddings", "layer 1", "layer 2", "layer 3"]
    for i, p in enumerate(phases):
        assert p["steps"] == [i * PHASE, (i + 1) * PHASE] and p["trains"] == [i] and p["layer_map"] == [(i, i)]
        assert p["columns"] == BASE_COLUMNS + [f"hidden_{i}"] + ([f"attention_{i}"] if i else [])
        assert set(p["losses"]) == {"fmt", "fmt_mean", "fmt_var"} | ({"at"} if i else set())


def test_progressive_trains_one_layer_at_a_time_and_keeps_the_token_table(setup, progressive_run):
    states = _states(setup, progressive_run)
    table = "model.embeddings.word_embeddings.weight"
    assert set(states[0]) == set(states[1])
    for phase, (before, after) in enumerate(zip(states, states[1:])):
        assert _changed_groups(before, after) == {phase}, phase  # the layers below (and above) are bit-identical
        assert torch.equal(before[table], after[table]), phase


def test_progressive_phases_log_their_names_and_lower_their_own_loss(setup, progressive_run):
    from kdcache.pipeline.student.trainer import plan_run
    from kdcache.pipeline.student.trainer.data import RankStream
    from kdcache.pipeline.student.trainer.driver import normalize
    from kdcache.pipeline.student.trainer.step import build_components, enter_phase
    from kdcache.storage import CacheReader

    rows = run_metrics(progressive_run)
    names = ["embeddings"] + [f"layer {i}" for i in range(1, LAYERS + 1)]
    assert [r["phase"] for r in rows] == [n for n in names for _ in range(PHASE)]
    assert all(("loss_at" in r) == (r["phase"] != "embeddings") for r in rows)  # each phase, its own terms
    for i in range(LAYERS + 1):
        losses = [r["loss"] for r in rows[i * PHASE:(i + 1) * PHASE]]
        assert sum(losses[-4:]) < sum(losses[:4]), names[i]

    # Each phase's loss on one fixed batch (the whole cache, dropout off), at its start and its end.
    cfg = normalize(_progressive(setup, "eval"))
    plan = plan_run(cfg)
    c = build_components(cfg, plan, torch.device("cpu"), 1)
    batch = next(RankStream(CacheReader(cfg.cache), plan.columns, 64, 0, 1).batches(0))
    c.student.eval()
    states = _states(setup, progressive_run)
    for i, phase in enumerate(plan.phases):
        enter_phase(c, phase)
        values = []
        for state in states[i:i + 2]:
            c.student.load_state_dict(state)
            with torch.no_grad():
                values.append(c.loss_fn(c.student(batch["input_ids"], batch["attention_mask"]), batch)[0].item())
        assert values[1] < 0.9 * values[0], (phase.name, values)


def test_progressive_resume_mid_phase_is_exact(setup, progressive_run):
    from safetensors.torch import load_file

    # checkpoints at 10, 20, ...: the failure before step 27 resumes at 20 (inside layer 1's phase, 15-30),
    # the one before step 48 at 40 (inside layer 2's, 30-45) and crosses into layer 3's phase
    crashed = _progressive(setup, "crash", ["checkpoint_every=10", "fail_at_step=[27, 48]"])
    for step in (27, 48):
        with pytest.raises(RuntimeError, match=f"injected failure before step {step}"):
            train(crashed, log=lambda *_: None)
    summary = train(crashed, log=lambda *_: None)
    assert summary["resumed_from_step"] == 40 and summary["steps"] == (LAYERS + 1) * PHASE
    ref, got = run_metrics(progressive_run), run_metrics(setup / "crash")
    assert [(r["step"], r["phase"]) for r in got] == [(r["step"], r["phase"]) for r in ref]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
    want = load_file(str(progressive_run / "student" / "model.safetensors"))
    have = load_file(str(setup / "crash" / "student" / "model.safetensors"))
    assert want.keys() == have.keys()
    for k in want:
        assert torch.equal(want[k], have[k]), k


def test_progressive_resume_with_other_steps_is_refused(setup):
    # phases split the steps: with other steps, a checkpoint's step would fall in another phase
    cfg = _progressive(setup, "moved", ["checkpoint_every=10", "fail_at_step=12"])
    with pytest.raises(RuntimeError, match="injected failure before step 12"):
        train(cfg, log=lambda *_: None)
    longer = _progressive(setup, "moved", ["checkpoint_every=10", f"steps={(LAYERS + 1) * PHASE * 2}"])
    with pytest.raises(CompatibilityError, match="knowledge-transfer phases differ"):
        train(longer, log=lambda *_: None)


@pytest.mark.parametrize("knowledge_transfer", ["progressive", "auxiliary"])
def test_a_cache_without_a_layers_attention_is_refused(setup, knowledge_transfer):
    cfg = _cfg(setup, "no_attn3", cache="cache_no_attn3", steps=8,
               overrides=[f"knowledge_transfer={knowledge_transfer}"])
    with pytest.raises(CompatibilityError, match=r"attention layer 3\b(?s:.*)--attention-layers 1,2,3"):
        validate(cfg)


def test_auxiliary_and_layerwise_joint_are_one_phase_where_everything_trains(setup):
    for kind in ("auxiliary", "joint"):
        (phase,) = validate(_cfg(setup, kind, steps=3, overrides=[f"knowledge_transfer={kind}"]))["knowledge_transfer"]
        assert phase["layer_map"] == [(i, i) for i in range(LAYERS + 1)] and phase["trains"] == "all"
        assert set(phase["losses"]) == {"fmt", "fmt_mean", "fmt_var", "at"} and phase["steps"] == [0, 3]
    train(_cfg(setup, "auxiliary", steps=3, overrides=["knowledge_transfer=auxiliary", "checkpoint_every=3"]),
          log=lambda *_: None)
    rows = run_metrics(setup / "auxiliary")
    assert len(rows) == 3 and not any("phase" in r for r in rows)
    assert {"loss_fmt", "loss_fmt_mean", "loss_fmt_var", "loss_at"} <= set(rows[0])
    before, after = _initial(setup), _checkpoint(setup / "auxiliary", 3)
    assert _changed_groups(before, after) == set(range(LAYERS + 1))
    table = "model.embeddings.word_embeddings.weight"
    assert not torch.equal(before[table], after[table])  # auxiliary trains the token table too


def test_joint_and_progressive_with_prediction_terms_end_with_a_prediction_phase():
    spec = LossSpec(weights={"fmt": 1.0, "at": 1.0, "pred": 0.5, "ce": 0.5}, layer_map=[(0, 0), (1, 1)])
    layerwise, prediction = build_phases("joint", spec, 9)
    assert (layerwise.start, layerwise.end, prediction.start, prediction.end) == (0, 5, 5, 9)  # remainder first
    assert set(layerwise.spec.active()) == {"fmt", "at"} and layerwise.spec.layer_map == [(0, 0), (1, 1)]
    assert set(prediction.spec.active()) == {"pred", "ce"}
    assert layerwise.train is None and prediction.train is None
    with pytest.raises(ValueError, match="joint runs the layer-wise terms, then the prediction terms, but the run "
                                         "has 1 step"):
        build_phases("joint", spec, 1)  # else its prediction phase would be empty
    phases = build_phases("progressive", spec, 9)
    assert [(p.name, p.train, set(p.spec.active())) for p in phases] == [
        ("embeddings", (0,), {"fmt"}), ("layer 1", (1,), {"fmt", "at"}), ("prediction terms", None, {"pred", "ce"})]
    assert [(p.start, p.end) for p in phases] == [(0, 3), (3, 6), (6, 9)]
    # the prediction terms alone: one phase for joint and auxiliary, nothing to do layer by layer
    assert len(build_phases("joint", LossSpec(weights={"pred": 1.0}), 4)) == 1
    with pytest.raises(ValueError, match="progressive trains one layer at a time"):
        build_phases("progressive", LossSpec(weights={"pred": 1.0}), 4)


def test_task_stage_with_layerwise_terms_runs_joint_as_layerwise_then_prediction(tmp_path):
    """mobilebert-task on a classifier's cache of logits, hidden states and attention, with the layer-wise
    terms switched on (the paper's comparison): joint = two phases, each reading its own columns; the
    layer map is the student's (l <-> l) though the task preset has none."""
    from kdcache.pipeline.student.mobilebert import init_mobilebert_student
    from kdcache.pipeline.student.models import with_classification_head
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    clf = make_teacher(tmp_path / "clf", "classifier", layers=2)
    run_cache_pass(CacheConfig(out=str(tmp_path / "cache"), teacher=clf, corpus=[tiny_corpus(tmp_path / "c.jsonl")],
                               mode="examples", label_field="label", max_length=16, batch_size=8, progress=False,
                               hidden_layers="all", attention_layers="all"), executor="local", log=lambda *_: None)
    init_mobilebert_student(clf, tmp_path / "encoder", bottleneck=16, ffn_stack=2, embedding_size=16)
    with_classification_head(tmp_path / "encoder", tmp_path / "student", 2)
    cfg = load_train_config("mobilebert-task", None, {
        "cache": str(tmp_path / "cache"), "student": str(tmp_path / "student"), "out": str(tmp_path / "run"),
        "batch_size": BATCH, "progress": False, "no_ray": True, "steps": 4},
        ["knowledge_transfer=joint", "loss_weights.fmt=1", "loss_weights.at=1"])
    layerwise, prediction = validate(cfg)["knowledge_transfer"]
    assert (layerwise["name"], layerwise["steps"], set(layerwise["losses"])) == ("layer-wise terms", [0, 2],
                                                                                  {"fmt", "at"})
    assert layerwise["layer_map"] == [(0, 0), (1, 1), (2, 2)] and layerwise["trains"] == "all"
    assert layerwise["columns"] == BASE_COLUMNS + ["hidden_0", "hidden_1", "hidden_2", "attention_1", "attention_2"]
    assert (prediction["name"], prediction["steps"], set(prediction["losses"])) == ("prediction terms", [2, 4],
                                                                                    {"pred", "ce"})
    assert prediction["columns"] == BASE_COLUMNS + ["task_logits", "label"] and prediction["trains"] == "all"
    train(cfg, log=lambda *_: None)
    rows = run_metrics(tmp_path / "run")
    assert [(r["phase"], "loss_fmt" in r, "loss_pred" in r) for r in rows] == [
        ("layer-wise terms", True, False)] * 2 + [("prediction terms", False, True)] * 2


@pytest.mark.parametrize("overrides, message", [
    (["knowledge_transfer=progressive"], r"progressive has 4 phases \(embeddings, layer 1, layer 2, layer 3\) but "
                                         r"the run has 3 steps"),
    (["knowledge_transfer=bogus"], "knowledge_transfer must be one of auxiliary, joint, progressive, got 'bogus'"),
])
def test_bad_knowledge_transfer_is_refused(setup, overrides, message):
    with pytest.raises(CompatibilityError, match=message):
        validate(_cfg(setup, "bad", steps=3, overrides=overrides))


def test_a_parameter_the_student_froze_stays_frozen_in_every_phase():
    # e.g. the LLM demo's factory freezes the tied embedding: no phase may switch its gradient back on
    import torch.nn as nn

    from kdcache.pipeline.student.phases import Phase, apply_phase
    from kdcache.pipeline.student.terms import LossSpec

    model = nn.Module()
    model.embeddings = nn.Embedding(5, 3)
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
    model.classifier = nn.Linear(3, 2)
    model.embeddings.weight.requires_grad_(False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    spec = LossSpec(weights={"ce": 1.0})

    def on():
        return {n for n, p in model.named_parameters() if p.requires_grad}

    apply_phase(model, Phase("all terms", 0, 4, spec), trainable)
    assert "embeddings.weight" not in on() and "classifier.weight" in on()
    apply_phase(model, Phase("layer 2", 0, 4, spec, (2,)), trainable)
    assert on() == {"encoder.layer.1.weight", "encoder.layer.1.bias"}
    with pytest.raises(ValueError, match="no parameters there"):
        apply_phase(model, Phase("embeddings", 0, 4, spec, (0,)), trainable)
