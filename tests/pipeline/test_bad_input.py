"""Bad input and unsafe input (docs/reliability.md): a clear error naming the file / line / field,
nothing already written lost, nothing executed that the user did not allow, no credential stored.

Most bad-input cases live next to the code they exercise (tests/pipeline/data/test_corpus.py,
test_cache_pass.py, test_config.py, test_train.py); docs/reliability.md maps each to its test.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.pipeline.teacher_pass.run import run_cache_pass
from kdcache.pipeline.teacher_pass.config import prepare
from kdcache.pipeline.teacher_pass.config import CacheConfig
from kdcache.storage import CacheReader
from kdcache.storage.verify import verify_cache
from tests.support import make_teacher, tiny_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "t", "masked-lm")


def _cfg(teacher, corpus, out, **kw) -> CacheConfig:
    base = dict(teacher=teacher, corpus=[str(corpus)], out=str(out), max_length=16, batch_size=4,
                shard_tokens=16 * 4, top_k=4, topk_calibration_sequences=8, progress=False)
    return CacheConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------- #
# one huge document
# --------------------------------------------------------------------------------------------- #

STREAM_SCRIPT = """
import hashlib, json, resource, sys
from kdcache.pipeline.data.corpus import CorpusSpec, iter_documents

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
h, parts, longest, whole = hashlib.sha256(), 0, 0, 0
for doc in iter_documents(CorpusSpec([sys.argv[1]])):
    if doc.part is None:
        whole += 1
        continue
    parts += 1
    longest = max(longest, len(doc.text))
    h.update(doc.text.encode())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"sha256": h.hexdigest(), "parts": parts, "longest": longest, "whole": whole,
                  "peak_growth_bytes": (after - before) * 1024}))
"""


@pytest.mark.slow
def test_100mb_single_line_document_streams_with_bounded_memory(tmp_path):
    """A 100 MB line with no newline: read in pieces of at most max_doc_chars, peak RSS of the reading
    process growing by a small fraction of the line (measured in a fresh process)."""
    path = tmp_path / "huge.txt"
    chunk = "the film was good and the plot was long é ".encode() * 25_000  # ~1 MB, no newline
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(b"a short document\n")
        for _ in range(100):
            f.write(chunk)
            digest.update(chunk)
        f.write(b"\nanother short one\n")
    assert path.stat().st_size > 100_000_000
    proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(path)], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["whole"] == 2 and got["sha256"] == digest.hexdigest()  # the pieces concatenate back to the line
    assert got["parts"] >= 100 and got["longest"] <= 1_000_000  # CorpusSpec.max_doc_chars
    assert got["peak_growth_bytes"] < 40_000_000, got  # the line is 100 MB: it was never held whole


# --------------------------------------------------------------------------------------------- #
# a bad record in the middle of a corpus: clear error, the shards before it kept
# --------------------------------------------------------------------------------------------- #


def test_bad_line_mid_corpus_names_it_and_keeps_the_shards_before_it(tmp_path, teacher, monkeypatch):
    import kdcache.pipeline.teacher_pass.run as cache_pass

    # Above COUNT_LIMIT_BYTES the corpus is not read ahead to count it, so a bad record surfaces only when
    # the pass reaches it, with earlier shards committed: the situation of a real, large corpus.
    monkeypatch.setattr(cache_pass, "COUNT_LIMIT_BYTES", 0)
    # Documents are tokenised 256 at a time (pipeline/data/sequences.py): the bad one comes in the second group.
    corpus = Path(tiny_corpus(tmp_path / "corpus.jsonl", docs=320, words_per_doc=(5, 12)))
    lines = corpus.read_text().splitlines()
    good = lines[300]
    lines[300] = good.replace('"text":', '"txet":')  # no text field on line 301
    corpus.write_text("\n".join(lines) + "\n")
    options = dict(shard_tokens=16 * 32, batch_size=16)
    cfg = _cfg(teacher, corpus, tmp_path / "cache", **options)
    with pytest.raises(ValueError, match=rf"{corpus}: line 301: missing text field 'text'.*'txet'"):
        run_cache_pass(cfg, executor="local", log=lambda *_: None)
    shards = tmp_path / "cache" / "shards"
    kept = {p.name: p.read_bytes() for p in shards.glob("shard-*.parquet")}
    assert len(kept) >= 2 and len(list(shards.glob("shard-*.json"))) == len(kept)
    assert not (tmp_path / "cache" / "manifest.json").exists()

    lines[300] = good  # the user fixes the line and runs the same command again
    corpus.write_text("\n".join(lines) + "\n")
    summary = run_cache_pass(cfg, executor="local", log=lambda *_: None)
    assert summary["shards_skipped"] == len(kept)
    assert all((shards / name).read_bytes() == data for name, data in kept.items())
    fresh = run_cache_pass(_cfg(teacher, corpus, tmp_path / "fresh", **options), executor="local",
                           log=lambda *_: None)
    assert [s.checksum for s in CacheReader(cfg.out).manifest.shards] == \
           [s.checksum for s in CacheReader(str(tmp_path / "fresh")).manifest.shards]
    assert fresh["shards_total"] == summary["shards_total"] and verify_cache(cfg.out)[0] == []


# --------------------------------------------------------------------------------------------- #
# options out of range
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("option,value,match", [
    ("attention_layers", "0", r"--attention-layers: layer\(s\) \[0\] out of range; the teacher has layers 1\.\.2"),
    ("attention_layers", "1,3", r"--attention-layers: layer\(s\) \[3\] out of range"),
    ("hidden_layers", "-1", r"--hidden-layers: layer\(s\) \[-1\] out of range; the teacher has layers 0\.\.2"),
    ("hidden_layers", "last", r"--hidden-layers: expected comma-separated integers, 'all' or 'none', got 'last'"),
    ("top_k", 10_000, r"--top-k 10000 is larger than the vocabulary \(\d+ tokens\)"),
], ids=["attention-0", "attention-3", "hidden-negative", "hidden-word", "k-over-vocab"])
def test_options_out_of_range_are_refused_before_anything_runs(tmp_path, teacher, option, value, match):
    corpus = tiny_corpus(tmp_path / "c.jsonl", docs=4)
    with pytest.raises(ValueError, match=match):
        run_cache_pass(_cfg(teacher, corpus, tmp_path / "cache", **{option: value}), executor="local",
                       log=lambda *_: None)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------- #
# security: code in a teacher folder runs only when the user says so
# --------------------------------------------------------------------------------------------- #


def test_teacher_remote_code_does_not_run_without_trust_remote_code(tmp_path, teacher):
    folder = tmp_path / "remote"
    shutil.copytree(teacher, folder)
    marker = tmp_path / "remote-code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="kdcache-remote-test",
                  auto_map={"AutoConfig": "configuration_remote.RemoteConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_remote.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()  # what any code in a downloaded folder could do\n"
        "from transformers import BertConfig\n\n\n"
        "class RemoteConfig(BertConfig):\n    model_type = 'kdcache-remote-test'\n")
    corpus = tiny_corpus(tmp_path / "c.jsonl", docs=4)
    with pytest.raises(ValueError, match="trust_remote_code"):
        prepare(_cfg(str(folder), corpus, tmp_path / "cache"))
    assert not marker.exists()
    # The same folder with the user's explicit consent: its code runs (so the refusal above was the guard).
    try:
        prepare(_cfg(str(folder), corpus, tmp_path / "cache", trust_remote_code=True))
    except Exception:  # noqa: BLE001 - whatever the remote config then does, its code has run
        pass
    assert marker.exists()


class _Payload:
    """A pickle that runs code when loaded (here: it creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_teacher_refused_unless_allowed_and_then_loaded_weights_only(tmp_path, teacher):
    import torch
    from transformers import AutoModelForMaskedLM

    from kdcache.pipeline.teacher_pass.teacher import TeacherOptions, load_teacher

    folder = tmp_path / "pickled"
    shutil.copytree(teacher, folder)
    (folder / "model.safetensors").unlink()
    reference = AutoModelForMaskedLM.from_pretrained(teacher)
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PermissionError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        load_teacher(TeacherOptions(str(folder), device="cpu"), need_attentions=False)
    model, _, _ = load_teacher(TeacherOptions(str(folder), allow_pickle=True, device="cpu"), need_attentions=False)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    # Allowed, a pickle is still loaded with weights_only=True: one that carries code is refused, unrun.
    marker = tmp_path / "pickle-code-ran"
    torch.save({**reference.state_dict(), "payload": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_teacher(TeacherOptions(str(folder), allow_pickle=True, device="cpu"), need_attentions=False)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- #
# security: no credentials in manifests, shards or logs
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("url,secret", [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/caches/bert", "wJalrXUtnFEMI"),
    ("https://user:hunter2@data.example.com/corpus.jsonl", "hunter2"),
    ("https://bucket.s3.amazonaws.com/c.jsonl?X-Amz-Credential=AKIAEXAMPLE%2F&X-Amz-Signature=abc123", "abc123"),
    ("hf://datasets/org/name?token=hf_secret123", "hf_secret123"),
])
def test_redact_removes_credentials_from_urls(url, secret):
    from kdcache.storage.fs import redact

    clean = redact(url)
    assert secret not in clean and "***" in clean
    assert clean.split("://")[0] == url.split("://")[0]  # still says where the data is


def test_credentials_in_urls_reach_no_manifest_shard_or_log(tmp_path, teacher, capsys):
    """Corpus and cache addressed by URLs that carry a key (fsspec's in-memory filesystem stands in for
    the object store; the URL handling is the same): no byte of any file written, no log line and no
    error message holds the secret."""
    import fsspec

    secret = "wJalrXUtnFEMIK7MDENG"
    root = f"memory://AKIAEXAMPLE:{secret}@kdcache-creds-test"
    fs = fsspec.filesystem("memory")
    try:
        fs.pipe(f"/AKIAEXAMPLE:{secret}@kdcache-creds-test/corpus.jsonl",
                Path(tiny_corpus(tmp_path / "c.jsonl", docs=12)).read_bytes())
        said: list[str] = []
        summary = run_cache_pass(_cfg(teacher, f"{root}/corpus.jsonl", f"{root}/cache"), executor="local",
                                 log=said.append)
        assert summary["shards_total"] >= 2 and secret not in json.dumps(summary) + " ".join(said)
        reader = CacheReader(f"{root}/cache")
        for name in fs.find(f"/AKIAEXAMPLE:{secret}@kdcache-creds-test/cache"):
            assert secret.encode() not in fs.cat(name), name  # manifest, intent, markers, shard bytes
        sources = [s for b in reader.iter_batches(["source"]) for s in b.column("source").to_pylist()]
        assert sources and all(secret not in s and s.startswith("memory://***@kdcache-creds-test/") for s in sources)
        # Errors name the file, not the key.
        with pytest.raises(FileNotFoundError) as err:
            run_cache_pass(_cfg(teacher, f"{root}/missing-*.jsonl", f"{root}/other"), executor="local",
                           log=said.append)
        assert "missing-*.jsonl" in str(err.value) and secret not in str(err.value)
        assert secret not in capsys.readouterr().out
    finally:
        fs.rm(f"/AKIAEXAMPLE:{secret}@kdcache-creds-test", recursive=True)


# --------------------------------------------------------------------------------------------- #
# security: a local Ray cluster's dashboard listens on loopback only
# --------------------------------------------------------------------------------------------- #


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_cluster_dashboard_is_bound_to_loopback():
    import psutil
    import ray

    from kdcache.pipeline.common.runtime import init_ray

    assert init_ray(None, num_cpus=1)  # the cluster `kdcache cache` / `kdcache train` start without --address
    try:
        webui = ray._private.worker.global_worker.node.address_info.get("webui_url") or ""
        assert webui == "" or webui.startswith("127.0.0.1:"), webui
        dashboards = [p for p in psutil.Process().children(recursive=True)
                      if any(part.endswith("dashboard/dashboard.py") for part in p.cmdline())]
        for p in dashboards:
            assert "--host=127.0.0.1" in p.cmdline(), p.cmdline()
            http = [c.laddr for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port == 8265]
            assert all(addr.ip == "127.0.0.1" for addr in http), http
    finally:
        ray.shutdown()
