"""BiLSTM/CNN students (kdcache.pipeline.student.small): save/load in one call, padding invariance,
Tang's loss, `init-student --architecture`, training from a task-logit cache and `kdcache eval`."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kdcache.pipeline.student.config import load_train_config
from kdcache.pipeline.student.losses import logit_mse
from kdcache.pipeline.student.presets import tang
from kdcache.pipeline.student.small import (SMALL_STUDENTS, BiLSTMClassifier, CellCNNClassifier, CNNClassifier,
                                            TinyTransformerClassifier, init_small_student, load_small_student,
                                            param_counts)
from kdcache.pipeline.student.terms import CompositeLoss
from kdcache.pipeline.student.trainer import train, validate
from tests.support import make_teacher, tiny_corpus

SEP = 3  # tests.support's vocabulary: [PAD] [UNK] [CLS] [SEP] [MASK] words...

MODELS = {
    "bilstm-final": lambda: BiLSTMClassifier(vocab_size=60, num_labels=3, embedding_size=12, hidden=8, dense=10),
    "bilstm-max": lambda: BiLSTMClassifier(vocab_size=60, num_labels=3, embedding_size=12, hidden=8, dense=10,
                                           pooling="max"),
    "bilstm-pair": lambda: BiLSTMClassifier(vocab_size=60, num_labels=3, embedding_size=12, hidden=8, dense=10,
                                            pair=True, sep_token_id=SEP),
    "cnn": lambda: CNNClassifier(vocab_size=60, num_labels=3, embedding_size=12, filters=6, kernel_sizes=[2, 3, 5]),
    # every op of the cell space once, two cells deep (the second reads the first's output and input)
    "cellcnn": lambda: CellCNNClassifier(vocab_size=60, num_labels=3, embedding_size=12, channels=6, cells=2, genotype=[
        [["conv3", 0], ["conv5", 1]], [["conv7", 2], ["dilconv3", 1]], [["dilconv5", 3], ["dilconv7", 0]],
        [["maxpool3", 4], ["avgpool3", 2]], [["identity", 5], ["avgpool3", 0]]]),
    "tinytransformer": lambda: TinyTransformerClassifier(vocab_size=60, num_labels=3, embedding_size=12, width=8,
                                                         layers=2, heads=2, ffn=16, dropout=0.0),
}


def _rows(seed: int = 0, n: int = 7) -> list[list[int]]:
    """Token rows of different lengths (1 to 11 tokens) framed [CLS] ... [SEP] ... [SEP]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        body = torch.randint(5, 60, (1 + (3 * i) % 9,), generator=g).tolist()
        cut = max(1, len(body) // 2)
        rows.append([2, *body[:cut], SEP, *body[cut:], SEP] if i % 3 else body[:1 + i % 2])
    return rows


def _batch(rows: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("name", MODELS)
def test_padding_never_changes_a_logit(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    rows = _rows()
    with torch.no_grad():
        one_by_one = torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)).logits
                                for r in rows])
        for left in (False, True):
            ids, mask = _batch(rows, left)
            torch.testing.assert_close(model(ids, mask).logits, one_by_one, atol=1e-6, rtol=1e-5)
        # the padding id's own embedding is not what keeps pads out: scramble it
        model.embed.weight[0].normal_()
        ids, mask = _batch(rows)
        torch.testing.assert_close(model(ids, mask).logits, one_by_one, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_in_one_call_predict_identically(name, tmp_path):
    torch.manual_seed(1)
    model = MODELS[name]().eval()
    ids, mask = _batch(_rows(seed=3))
    model.save_pretrained(str(tmp_path / name))
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["architecture"] in SMALL_STUDENTS and (tmp_path / name / "model.safetensors").is_file()
    for loaded in (load_small_student(tmp_path / name), type(model).from_pretrained(str(tmp_path / name)).eval()):
        with torch.no_grad():
            assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)
    assert not load_small_student(tmp_path / name).training  # ready to predict: dropout off


def test_load_refuses_other_folders(tmp_path):
    clf = make_teacher(tmp_path / "clf", "classifier")
    with pytest.raises(ValueError, match="no kdcache BiLSTM/CNN student.*init-student --architecture"):
        load_small_student(clf)


def test_tang_loss_at_alpha_zero_is_the_logit_mse_and_its_gradient_checks():
    torch.manual_seed(0)
    student = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, -100, 1, -100])
    loss = CompositeLoss(tang(alpha=0.0))
    total, parts = loss.compute({"logits": student}, {"task_logits": teacher, "label": labels,
                                                      "attention_mask": torch.ones(5, 4)})
    expected = ((student - teacher) ** 2).sum(-1).mean()
    assert set(loss.weights) == {"logit_mse"} and torch.allclose(total.double(), expected)
    assert torch.allclose(parts["logit_mse"].double(), expected)
    assert torch.autograd.gradcheck(lambda s: logit_mse(s, teacher), (student,), eps=1e-6, atol=1e-6)
    # α weighs the gold-label CE in; rows labelled -100 (augmented copies) add nothing to it
    total_half, parts_half = CompositeLoss(tang(alpha=0.5)).compute(
        {"logits": student}, {"task_logits": teacher, "label": labels, "attention_mask": torch.ones(5, 4)})
    keep = labels != -100
    ce = torch.nn.functional.cross_entropy(student[keep], labels[keep])
    assert torch.allclose(total_half.double(), 0.5 * ce + 0.5 * expected)
    assert set(CompositeLoss(tang(alpha=0.1, distill="kl", temperature=2.0)).weights) == {"ce", "pred"}
    with pytest.raises(ValueError, match="alpha"):
        tang(alpha=1.5)


# --------------------------------------------------------------------------------------------- #
# init-student, training from a cache, eval
# --------------------------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A classifier teacher's task-logit cache, a masked-LM cache (no task logits), two students;
    then both teacher folders are deleted."""
    from kdcache.pipeline.teacher_pass.config import CacheConfig
    from kdcache.pipeline.teacher_pass.run import run_cache_pass

    root = tmp_path_factory.mktemp("small")
    corpus = tiny_corpus(root / "c.jsonl", docs=48)
    clf = make_teacher(root / "clf", "classifier", layers=2)
    mlm = make_teacher(root / "mlm", "masked-lm", layers=2)
    common = dict(corpus=[corpus], mode="examples", label_field="label", max_length=16, batch_size=8,
                  shard_tokens=16 * 12, progress=False)
    run_cache_pass(CacheConfig(out=str(root / "cache"), teacher=clf, **common), executor="local", log=lambda *_: None)
    run_cache_pass(CacheConfig(out=str(root / "cache_mlm"), teacher=mlm, **common), executor="local",
                   log=lambda *_: None)
    init_small_student(clf, root / "bilstm", "bilstm", hidden=16, dense=16)
    init_small_student(clf, root / "cnn", "cnn", filters=8, embedding_size=16)
    from safetensors.torch import load_file

    table = load_file(str(Path(clf) / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
    torch.save(table, root / "teacher_table.pt")
    shutil.copytree(clf, root / "clf_for_eval")
    shutil.rmtree(clf)
    shutil.rmtree(mlm)
    return root


def _cfg(root: Path, recipe: str, out: str, cache: str = "cache", **flags):
    overrides = flags.pop("overrides", [])
    base = {"cache": str(root / cache), "student": str(root / recipe), "out": str(root / out), "batch_size": 8,
            "progress": False, **flags}
    return load_train_config(recipe, None, base, overrides)


def test_init_student_copies_or_projects_the_teacher_table(setup):
    table = torch.load(setup / "teacher_table.pt", weights_only=True)
    bilstm, cnn = load_small_student(setup / "bilstm"), load_small_student(setup / "cnn")
    assert torch.equal(bilstm.embed.weight, table)  # same width: a copy
    # narrower: the centred table projected onto its top principal directions keeps most of its variance
    centred = table - table.mean(0)
    kept = (cnn.embed.weight - cnn.embed.weight.mean(0)).pow(2).sum() / centred.pow(2).sum()
    assert cnn.embed.weight.shape == (table.shape[0], 16) and 0.5 < float(kept) <= 1.0 + 1e-5
    record = json.loads((setup / "cnn" / "kdcache_student.json").read_text())
    assert record["params"] == param_counts(cnn)["params"] > record["params_without_embeddings"]
    assert "PCA 32 -> 16" in record["embedding_init"]
    assert (setup / "cnn" / "tokenizer_config.json").is_file()


def test_cli_init_student_architectures(setup, capsys, tmp_path):
    from kdcache.pipeline.cli.main import main

    teacher = str(setup / "clf_for_eval")
    assert main(["init-student", "--architecture", "cnn", "--teacher", teacher, "--out", str(tmp_path / "c"),
                 "--filters", "5", "--kernel-sizes", "2,4", "--embedding-init", "random", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["kernel_sizes"] == [2, 4] and record["filters"] == 5 and record["embedding_init"] == "random"
    assert load_small_student(tmp_path / "c").convs[1].kernel_size == (4,)
    for argv, message in (
            (["--architecture", "bilstm", "--filters", "5"], "bilstm students take no --filters"),
            (["--architecture", "cnn", "--num-layers", "2"], "--num-layers: transformer students only"),
            (["--hidden", "8"], "--hidden: BiLSTM/CNN students only"),
            (["--architecture", "cnn", "--embedding-size", "64"], "wider than the teacher's embeddings")):
        assert main(["init-student", "--teacher", teacher, "--out", str(tmp_path / "x"), *argv]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_from_task_logits_then_resume_exactly(setup):
    """Both students train from the cache alone (teachers deleted); a crash resumes to the same losses."""
    for recipe in ("bilstm", "cnn"):
        summary = train(_cfg(setup, recipe, f"run_{recipe}", no_ray=True, steps=30, overrides=["lr=5e-3"]),
                        log=lambda *_: None)
        assert "loss_logit_mse" in summary["final_metrics"]
        rows = [json.loads(x) for x in (setup / f"run_{recipe}" / "metrics.jsonl").read_text().splitlines()]
        first, last = sum(r["loss"] for r in rows[:5]), sum(r["loss"] for r in rows[-5:])
        assert last < 0.7 * first, recipe
        assert load_small_student(setup / f"run_{recipe}" / "student").num_labels == 2
    extra = ["checkpoint_every=4", "shuffle=true"]
    train(_cfg(setup, "cnn", "ref", no_ray=True, steps=10, overrides=extra), log=lambda *_: None)
    crashed = _cfg(setup, "cnn", "crash", no_ray=True, steps=10, overrides=[*extra, "fail_at_step=7"])
    with pytest.raises(RuntimeError, match="injected failure before step 7"):
        train(crashed, log=lambda *_: None)
    assert train(crashed, log=lambda *_: None)["resumed_from_step"] == 4
    ref, got = ([json.loads(x)["loss"] for x in (setup / r / "metrics.jsonl").read_text().splitlines()]
                for r in ("ref", "crash"))
    assert got == pytest.approx(ref, rel=1e-5)


def test_a_cache_without_task_logits_is_refused(setup):
    with pytest.raises(Exception, match="task_logits") as err:
        validate(_cfg(setup, "bilstm", "x", cache="cache_mlm"))
    assert "logit_mse" in str(err.value)


def test_eval_takes_small_students(setup):
    from kdcache.pipeline.evaluation.evaluate import run_eval

    if not (setup / "run_cnn" / "student").exists():
        pytest.skip("needs test_train_from_task_logits_then_resume_exactly's runs")
    flat = run_eval(str(setup / "clf_for_eval"), {"cnn": str(setup / "run_cnn" / "student"),
                                                   "bilstm": str(setup / "run_bilstm" / "student")},
                    str(setup / "c.jsonl"), setup / "report", rounds=1, log=lambda *_: None)
    models = flat["models"]
    assert models["cnn"]["architecture"] == "cnn" and models["bilstm"]["architecture"] == "bilstm"
    assert models["cnn"]["params_without_embeddings"] < models["cnn"]["params"]
    assert all(math.isfinite(m["throughput_batch32"]) and 0 <= m["accuracy"] <= 1 for m in models.values())
    assert "| bilstm | BiLSTM 2 × 16 |" in Path(flat["report"]).read_text()


@pytest.mark.ray
@pytest.mark.slow
def test_two_ray_train_workers(setup, ray_cluster):
    """Data parallelism for a small student: two Ray Train workers, each its own shards."""
    summary = train(_cfg(setup, "cnn", "ray2", workers=2, steps=4, overrides=["checkpoint_every=2"]),
                    log=lambda *_: None)
    assert summary["steps"] == 4 and summary["workers"] == 2
    assert load_small_student(setup / "ray2" / "student").num_labels == 2
