"""`kdcache init-student` through its argparse wiring (kdcache.pipeline.cli.train.register)."""
from __future__ import annotations

import argparse
import json

import pytest

from kdcache.pipeline.cli.train import register
from tests.support import make_teacher


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kdcache")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    # A causal LM: tests.support builds its tokenizer from a tokenizer object (no vocab file needed).
    return make_teacher(tmp_path_factory.mktemp("t") / "teacher", "causal-lm", layers=4, hidden=32, heads=4)


def test_copy_mode_writes_a_loadable_student(tmp_path, teacher, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    assert _run(["init-student", "--teacher", teacher, "--out", str(out), "--layers", "0,3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mode"] == "copy" and record["teacher_layers"] == [0, 3]
    assert record["hidden_layer_map"] == [[0, 0], [1, 1], [2, 4]]
    student = AutoModelForCausalLM.from_pretrained(str(out))
    assert student.config.num_hidden_layers == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tok("the city river")["input_ids"]])
    assert student(ids).logits.shape[-1] == student.config.vocab_size
    # the copied block is the teacher's block 3, tensor for tensor
    t = AutoModelForCausalLM.from_pretrained(teacher)
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, t.model.layers[3].mlp.up_proj.weight)


def test_num_layers_and_random_narrow_student(tmp_path, teacher, capsys):
    from transformers import AutoModelForCausalLM

    assert _run(["init-student", "--teacher", teacher, "--out", str(tmp_path / "a"), "--num-layers", "2"]) == 0
    assert "layers" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).config.num_hidden_layers == 2

    assert _run(["init-student", "--teacher", teacher, "--out", str(tmp_path / "b"), "--num-layers", "2",
                 "--hidden-size", "16", "--num-heads", "2", "--seed", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mode"] == "random" and record["hidden_size"] == 16 and record["seed"] == 3
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "b")).config.hidden_size == 16


def test_bad_arguments_fail_clearly(tmp_path, teacher):
    with pytest.raises(ValueError, match="out of range"):
        _run(["init-student", "--teacher", teacher, "--out", str(tmp_path / "s"), "--layers", "0,9"])
    with pytest.raises(ValueError, match="comma-separated"):
        _run(["init-student", "--teacher", teacher, "--out", str(tmp_path / "s"), "--layers", "a,b"])
    with pytest.raises(SystemExit):  # argparse: --layers and --num-layers exclude each other
        _run(["init-student", "--teacher", teacher, "--out", str(tmp_path / "s"), "--layers", "0", "--num-layers", "1"])
    with pytest.raises(FileNotFoundError):
        _run(["init-student", "--teacher", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")])
