"""`efficient-rl merge` (DLER update-selective merging) against a plain-torch reference on full state dicts."""

import argparse
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from efficient_rl.errors import ConfigError
from efficient_rl.models import merge
from efficient_rl.models.merge import add_parser, kth_largest

LAYER0 = "model.layers.0."


def merge_cli(*argv) -> None:
    """Run `merge ARGV` through a parser built with add_parser, as the CLI does."""
    root = argparse.ArgumentParser(prog="efficient-rl")
    add_parser(root.add_subparsers(dest="command", required=True))
    args = root.parse_args(["merge", *map(str, argv)])
    assert args.handler(args) == 0


def tiny_qwen(vocab_size=50) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def state_dict(directory) -> dict:
    """Every tensor of a model directory, whole (the reference may hold everything; merge may not)."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_model(directory, tensors: dict, config_from) -> None:
    directory.mkdir()
    shutil.copy(config_from / "config.json", directory / "config.json")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def keep_count(keep, numel):
    return max(1, math.floor(keep * numel + 0.5))


def reference(base_dir, tuned_dir, keep, scale, per_tensor):
    """theta_base + scale * TopK_keep(delta) by sorting, and the masks of kept entries."""
    base, tuned = state_dict(base_dir), state_dict(tuned_dir)
    deltas = {name: tuned[name].float() - base[name].float() for name in tuned if tuned[name].is_floating_point()}
    if per_tensor:
        thresholds = {
            name: delta.abs().flatten().sort(descending=True).values[keep_count(keep, delta.numel()) - 1]
            for name, delta in deltas.items()
        }
    else:
        everything = torch.cat([delta.abs().flatten() for delta in deltas.values()]).sort(descending=True).values
        thresholds = dict.fromkeys(deltas, everything[keep_count(keep, len(everything)) - 1])
    masks = {name: (delta.abs() >= thresholds[name]) & (delta != 0) for name, delta in deltas.items()}
    merged = {name: base[name].float() + scale * deltas[name] * masks[name] for name in deltas}
    return merged, masks


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, tuned (a checkpoint-like directory), and both again as sharded directories."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = tiny_qwen()
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "base-sharded", max_shard_size="8KB")
    with torch.no_grad():  # layer 0 moves ten times more, so global and per-tensor selection disagree
        for name, parameter in model.named_parameters():
            parameter.add_(torch.randn_like(parameter) * (0.1 if name.startswith(LAYER0) else 0.01))
    model.save_pretrained(root / "tuned")
    model.save_pretrained(root / "tuned-sharded", max_shard_size="8KB")
    (root / "tuned" / "tokenizer_config.json").write_text("{}")
    (root / "tuned" / "trainer_state.pt").write_bytes(b"not part of a model")
    return root


def test_kth_largest_is_exact_on_streamed_chunks(monkeypatch):
    monkeypatch.setattr(merge, "CHUNK", 256)  # tensors are also cut into chunks inside
    torch.manual_seed(1)
    scales = 10.0 ** torch.randint(-42, 30, (3000,)).float()  # down to subnormals
    values = (torch.randn(3000) * scales).abs().to(torch.float32)
    values[:200] = 0.0
    values[200:400] = values[400]  # a long run of ties
    chunks = list(values.split(700))
    ordered = values.sort(descending=True).values
    for k in (1, 2, 150, 201, 1500, 2800, 3000):
        assert kth_largest(lambda: chunks, k) == ordered[k - 1].item(), k


@pytest.mark.parametrize("mode", ["--global", "--per-tensor"])
def test_merge_matches_the_reference(models, tmp_path, capsys, monkeypatch, mode):
    monkeypatch.setattr(merge, "CHUNK", 100)  # tensors are read and merged in blocks of a few rows
    out = tmp_path / "merged"
    merge_cli("--base", models / "base", "--tuned", models / "tuned", "--out", out, mode)
    printed = capsys.readouterr().out
    expected, masks = reference(models / "base", models / "tuned", 0.25, 0.7, per_tensor=mode == "--per-tensor")
    merged, base = state_dict(out), state_dict(models / "base")
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], atol=1e-6, rtol=0)
        assert torch.equal(merged[name] != base[name], masks[name]), name  # exactly the selected entries move

    kept = {name: int(mask.sum()) for name, mask in masks.items()}
    total = sum(mask.numel() for mask in masks.values())

    def kept_fraction(in_layer0: bool) -> float:
        chosen = [name for name in masks if name.startswith(LAYER0) == in_layer0]
        return sum(kept[name] for name in chosen) / sum(masks[name].numel() for name in chosen)

    if mode == "--per-tensor":  # each tensor keeps its own top quarter
        assert all(kept[name] == keep_count(0.25, mask.numel()) for name, mask in masks.items())
        assert "threshold" not in printed
    else:  # one ranking: the quarter of the model goes almost all to the layer that moved most
        assert sum(kept.values()) == keep_count(0.25, total)
        assert kept_fraction(in_layer0=True) > 0.5 and kept_fraction(in_layer0=False) < 0.05
        assert "global threshold: |delta| >= " in printed
    assert f"kept {sum(kept.values()):,} of {total:,} delta entries" in printed

    # The tuned model's config and tokenizer files come along, a checkpoint's trainer state does not.
    assert (out / "config.json").read_text() == (models / "tuned" / "config.json").read_text()
    assert (out / "tokenizer_config.json").exists() and not (out / "trainer_state.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging directory left


def test_keep_all_at_scale_one_reproduces_the_tuned_model(models, tmp_path):
    out = tmp_path / "merged"
    merge_cli("--base", models / "base", "--tuned", models / "tuned", "--out", out, "--keep", 1.0, "--scale", 1.0)
    tuned = state_dict(models / "tuned")
    merged = state_dict(out)
    assert merged.keys() == tuned.keys()
    assert all(torch.equal(merged[name], tuned[name]) for name in tuned)


def test_sharded_input_and_output_round_trip_through_from_pretrained(models, tmp_path):
    out = tmp_path / "merged"
    merge_cli(
        "--base",
        models / "base-sharded",
        "--tuned",
        models / "tuned",
        "--out",
        out,
        "--per-tensor",
        "--keep",
        0.3,
        "--scale",
        0.5,
        "--max-shard-mb",
        0.01,
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert all(shard.stat().st_size <= 10 * 1024 + 4096 for shard in shards)  # data <= 10 KiB, + the header
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {shard.name for shard in shards}

    expected, _ = reference(models / "base", models / "tuned", 0.3, 0.5, per_tensor=True)
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, atol=1e-6, rtol=0)

    # Sharded on both sides gives the same model as single files did.
    again = tmp_path / "again"
    merge_cli(
        "--base",
        models / "base-sharded",
        "--tuned",
        models / "tuned-sharded",
        "--out",
        again,
        "--per-tensor",
        "--keep",
        0.3,
        "--scale",
        0.5,
    )
    assert len(list(again.glob("*.safetensors"))) == 1
    assert all(torch.equal(state_dict(again)[name], state_dict(out)[name]) for name in expected)


def test_ties_zero_deltas_dtypes_and_non_float_tensors(tmp_path, models, capsys, monkeypatch):
    """Hand-made deltas: all entries tied at the threshold are kept, zero deltas never count, the
    tuned dtype is kept, and integer tensors come from the tuned model unchanged."""
    monkeypatch.setattr(merge, "CHUNK", 3)  # blocks: 3 entries of a, one row of b
    base = {"a": torch.zeros(8), "b": torch.ones(2, 1, 2), "step": torch.tensor([1, 2]), "scalar": torch.tensor(0.25)}
    tuned = {
        "a": torch.tensor([3.0, -2, 2, 2, 1, 0, 0, 0.5], dtype=torch.bfloat16),
        "b": torch.ones(2, 1, 2),
        "step": torch.tensor([7, 9]),
        "scalar": torch.tensor(0.25),
    }
    write_model(tmp_path / "base", base, models / "base")
    write_model(tmp_path / "tuned", tuned, models / "base")

    # Global: 13 float entries, k = 3, the 3rd largest |delta| is 2 and three entries equal it.
    merge_cli("--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--out", tmp_path / "global", "--scale", 0.5)
    merged = state_dict(tmp_path / "global")
    assert merged["a"].dtype == torch.bfloat16
    assert merged["a"].tolist() == [1.5, -1, 1, 1, 0, 0, 0, 0]
    assert torch.equal(merged["b"], base["b"]) and torch.equal(merged["step"], tuned["step"])
    assert merged["scalar"].shape == () and merged["scalar"].item() == 0.25
    printed = capsys.readouterr().out
    assert "kept 4 of 13 delta entries" in printed and "|delta| >= 2" in printed and "copied 1 other" in printed

    # Per tensor: a keeps its top 2 of 8 (4 with ties); b and scalar do not move, so nothing is kept.
    merge_cli(
        "--base",
        tmp_path / "base",
        "--tuned",
        tmp_path / "tuned",
        "--out",
        tmp_path / "per-tensor",
        "--scale",
        0.5,
        "--per-tensor",
    )
    assert state_dict(tmp_path / "per-tensor")["a"].tolist() == [1.5, -1, 1, 1, 0, 0, 0, 0]
    assert "kept 4 of 13 delta entries" in capsys.readouterr().out


def test_bad_input_is_a_one_line_error_naming_the_argument(models, tmp_path):
    base, tuned = models / "base", models / "tuned"
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-weights").mkdir()
    shutil.copy(base / "config.json", tmp_path / "no-weights" / "config.json")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep-me.txt").write_text("mine")
    torch.manual_seed(0)
    tiny_qwen(vocab_size=60).save_pretrained(tmp_path / "bigger-vocab")

    cases = [
        (["--keep", 0, "--out", tmp_path / "o"], "--keep"),
        (["--keep", 1.5, "--out", tmp_path / "o"], "--keep"),
        (["--base", tmp_path / "no-config", "--out", tmp_path / "o"], "--base"),
        (["--tuned", tmp_path / "no-weights", "--out", tmp_path / "o"], "--tuned"),
        (["--tuned", tmp_path / "missing", "--out", tmp_path / "o"], "--tuned"),
        (["--out", tmp_path / "busy"], "--overwrite"),
        (["--out", base], "--base"),
        (["--tuned", tmp_path / "bigger-vocab", "--out", tmp_path / "o"], "tensor lm_head.weight"),
    ]
    for argv, named in cases:
        defaults = {"--base": base, "--tuned": tuned}
        given = dict(zip(argv[::2], argv[1::2]))
        with pytest.raises(ConfigError) as error:
            merge_cli(*[str(item) for pair in {**defaults, **given}.items() for item in pair])
        message = str(error.value)
        assert "\n" not in message and named in message, message
    assert "shape [50, 16] in " + str(base) in message and str(tmp_path / "bigger-vocab") in message
    assert not (tmp_path / "o").exists() and (tmp_path / "busy" / "keep-me.txt").read_text() == "mine"

    merge_cli("--base", base, "--tuned", tuned, "--out", tmp_path / "busy", "--overwrite")
    assert not (tmp_path / "busy" / "keep-me.txt").exists() and (tmp_path / "busy" / "model.safetensors").exists()


def test_a_failed_merge_leaves_no_output(models, tmp_path):
    """A NaN in the last tensor fails the per-tensor merge after earlier shards were written."""
    tensors = state_dict(models / "tuned")
    tensors["model.norm.weight"][3] = float("nan")
    write_model(tmp_path / "broken", tensors, models / "tuned")
    out = tmp_path / "merged"
    argv = [
        "--base",
        models / "base",
        "--tuned",
        tmp_path / "broken",
        "--out",
        out,
        "--per-tensor",
        "--max-shard-mb",
        0.005,
    ]
    with pytest.raises(ConfigError, match="tensor model.norm.weight: non-finite values"):
        merge_cli(*argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]

    # With --overwrite, the model already at --out survives the failure.
    merge_cli("--base", models / "base", "--tuned", models / "tuned", "--out", out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError):
        merge_cli(*argv, "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "merged"]
