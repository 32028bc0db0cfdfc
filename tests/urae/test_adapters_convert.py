"""SVD split, exact minor-component conversion, preparing uploads for serving, and the CLI."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.urae.probe import transformer_output
from urae.adapters import (
    URAE_4K_TARGETS,
    AdapterFormat,
    apply_minor_components,
    convert_minor_components,
    difference_lora,
    inspect_adapter,
    load_adapter_layers,
    load_lora_state_dict,
    minor_component_targets,
    prepare_for_serving,
    save_lora,
    save_minor_components,
    svd_split,
)
from urae.adapters.builtin import tiny_lora_layers, tiny_minor_component_layers
from urae.errors import AdapterFormatError, BaseModelMismatchError, InvalidSpecError, TruncatedAdapterError
from urae.tiny import build_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]




@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 2K LoRA and a minor-component file trained (seeded) on top of it, in URAE's layouts."""
    folder = tmp_path_factory.mktemp("convert")
    transformer = build_tiny_pipeline("tiny").transformer
    lora_2k = tiny_lora_layers(transformer, seed=11)
    return {
        "2k": save_lora(folder / "urae_2k.safetensors", lora_2k),
        "4k": save_minor_components(
            folder / "urae_4k.safetensors", tiny_minor_component_layers(transformer, 12, lora_2k)
        ),
        "4k_plain_base": save_minor_components(
            folder / "minor_plain.safetensors", tiny_minor_component_layers(transformer, 13, rank=8)
        ),
    }


def test_svd_split_is_exact_and_takes_the_smallest_components() -> None:
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    major, b, a = svd_split(w, 5)
    assert b.shape == (24, 5) and a.shape == (5, 16)
    torch.testing.assert_close(major + b @ a, w, atol=1e-12, rtol=0)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:5], s[-5:], atol=1e-12, rtol=0)
    # The major part keeps the 11 largest components and nothing else.
    s_major = torch.linalg.svdvals(major)
    torch.testing.assert_close(s_major[:11], s[:11], atol=1e-12, rtol=0)
    assert s_major[11:].abs().max() < 1e-12
    # float32 in, float32 out, still exact to float32 rounding.
    w32 = w.float()
    major32, b32, a32 = svd_split(w32, 5)
    assert major32.dtype == b32.dtype == a32.dtype == torch.float32
    torch.testing.assert_close(major32 + b32 @ a32, w32, atol=1e-5, rtol=0)
    with pytest.raises(InvalidSpecError, match="rank"):
        svd_split(w, 17)


def test_difference_lora_stacks_factors() -> None:
    g = torch.Generator().manual_seed(2)
    b, a, b0, a0 = (
        torch.randn(8, 3, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(8, 3, generator=g),
        torch.randn(3, 6, generator=g),
    )
    extra = (torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g))
    up, down = difference_lora(b, a, b0, a0, extra)
    assert up.shape == (8, 8) and down.shape == (8, 6)
    torch.testing.assert_close(up @ down, b @ a - b0 @ a0 + extra[0] @ extra[1])
    up, down = difference_lora(b, a, b0, a0)
    assert up.shape == (8, 6)
    torch.testing.assert_close(up @ down, b @ a - b0 @ a0)


def test_target_lists() -> None:
    assert len(URAE_4K_TARGETS) == 190
    assert "single_transformer_blocks.37.attn.to_v" in URAE_4K_TARGETS
    assert not any(t.startswith("single_") and t.endswith("to_out.0") for t in URAE_4K_TARGETS)
    transformer = build_tiny_pipeline("tiny").transformer
    assert len(minor_component_targets(transformer)) == 2 * 4 + 2 * 3


@pytest.mark.parametrize("with_2k", [True, False])
def test_converted_lora_reproduces_the_minor_component_model(
    tmp_path: Path, files: dict[str, Path], with_2k: bool
) -> None:
    pipe = build_tiny_pipeline("tiny")
    transformer = pipe.transformer
    original = {k: v.clone() for k, v in transformer.state_dict().items()}
    base_output = transformer_output(transformer)

    source = files["4k"] if with_2k else files["4k_plain_base"]
    base_lora = files["2k"] if with_2k else None
    out = convert_minor_components(
        source, transformer, base_lora=base_lora, out_path=tmp_path / "converted.safetensors"
    )
    # The base weights were only read.
    assert all(torch.equal(v, original[k]) for k, v in transformer.state_dict().items())

    info = inspect_adapter(out, transformer)
    assert info.format is AdapterFormat.LORA and info.fits_base
    assert info.rank == (16 * 3 if with_2k else 8 * 2)
    assert info.trained_rank == (16 if with_2k else 8)
    assert info.metadata["urae_source_format"] == "minor_components"

    # Reference: the minor-component model itself (2K fused, SVD split, minor part replaced).
    reference = copy.deepcopy(transformer)
    _, minor = load_adapter_layers(source)
    _, fused = load_adapter_layers(base_lora) if base_lora else (None, None)
    apply_minor_components(reference, minor, fused)
    expected = transformer_output(reference)
    assert (expected - base_output).abs().max() > 1e-3, (
        "the adapter must change the output for this test to mean anything"
    )

    pipe.load_lora_weights(load_lora_state_dict(out, transformer), adapter_name="converted")
    assert (transformer_output(transformer) - expected).abs().max().item() < 1e-4


def test_convert_refuses_a_plain_lora_and_a_foreign_base(tmp_path: Path, files: dict[str, Path]) -> None:
    transformer = build_tiny_pipeline("tiny").transformer
    with pytest.raises(AdapterFormatError, match="already a plain LoRA"):
        convert_minor_components(files["2k"], transformer, out_path=tmp_path / "x.safetensors")
    big = save_minor_components(
        tmp_path / "big.safetensors",
        {"transformer_blocks.0.attn.to_q": (torch.zeros(3072, 2), torch.zeros(2, 3072))},
    )
    with pytest.raises(BaseModelMismatchError, match="big.safetensors"):
        convert_minor_components(big, transformer, out_path=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_prepare_for_serving(tmp_path: Path, files: dict[str, Path]) -> None:
    pipe = build_tiny_pipeline("tiny")
    transformer = pipe.transformer
    # A peft-prefixed LoRA with alpha is rewritten in normalised form with the same effect.
    module = "transformer_blocks.0.attn.to_v"
    up, down = torch.randn(32, 4), torch.randn(4, 32) * 0.05
    from safetensors.torch import save_file

    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": down,
            f"base_model.model.{module}.lora_B.weight": up,
            f"base_model.model.{module}.alpha": torch.tensor(2.0),
        },
        tmp_path / "upload.safetensors",
        metadata={"author": "someone"},
    )
    info = prepare_for_serving(
        tmp_path / "upload.safetensors", tmp_path / "registry" / "mine.safetensors", transformer
    )
    assert info.fits_base and info.format is AdapterFormat.LORA and info.metadata["author"] == "someone"
    state = load_lora_state_dict(info.path)
    assert set(state) == {f"transformer.{module}.lora_A.weight", f"transformer.{module}.lora_B.weight"}
    torch.testing.assert_close(state[f"transformer.{module}.lora_B.weight"], up * 0.5)

    # A minor-component upload is converted.
    info = prepare_for_serving(
        files["4k"], tmp_path / "registry" / "4k.safetensors", transformer, base_lora=files["2k"]
    )
    assert info.rank == 48 and info.metadata["urae_source_format"] == "minor_components"

    # Bad input: specific error, nothing written, an existing destination untouched.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(files["2k"].read_bytes()[:-7])
    with pytest.raises(TruncatedAdapterError):
        prepare_for_serving(broken, tmp_path / "registry" / "new.safetensors", transformer)
    before = (tmp_path / "registry" / "mine.safetensors").read_bytes()
    with pytest.raises(TruncatedAdapterError):
        prepare_for_serving(broken, tmp_path / "registry" / "mine.safetensors", transformer)
    assert (tmp_path / "registry" / "mine.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "registry").iterdir()) == ["4k.safetensors", "mine.safetensors"]


def start_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "urae", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


def test_cli_convert_inspect_and_errors(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from urae.cli import main

    out = tmp_path / "cli.safetensors"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 4)
    # Two processes at once: each spends most of its time importing torch and diffusers.
    converting = start_cli(
        "convert", str(files["4k"]), "--base-lora", str(files["2k"]), "--model", "tiny", "-o", str(out)
    )
    inspecting_broken = start_cli("inspect", str(broken))

    code, stdout, stderr = finish(converting)
    assert code == 0, stderr
    assert "rank 16 (exported as a plain LoRA of rank 48)" in stdout
    assert (inspect_adapter(out).rank, inspect_adapter(out).trained_rank) == (48, 16)

    code, _, stderr = finish(inspecting_broken)
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.safetensors" in lines[0] and "too short" in lines[0]

    # The same entry point in-process, to read the report.
    assert main(["inspect", str(out), "--model", "tiny"]) == 0
    report = capsys.readouterr().out
    # The rank the 4K adapter was trained at, and the rank it is served at.
    assert "format:     lora" in report and "rank:       16 (exported as a plain LoRA of rank 48)" in report
    assert "base model: fits tiny" in report
    assert "2 x transformer_blocks.*.attn.to_out.0" in report
    assert main(["inspect", str(out), "--model", "black-forest-labs/FLUX.1-dev"]) == 1
    report = capsys.readouterr().out
    assert "base model: does NOT fit black-forest-labs/FLUX.1-dev" in report


def test_fit_against_the_real_flux_architecture_without_weights(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    from urae.adapters.cli import shape_transformer

    flux_dev = shape_transformer("black-forest-labs/FLUX.1-dev")
    assert minor_component_targets(flux_dev) == URAE_4K_TARGETS
    real_sized = save_lora(
        tmp_path / "real.safetensors",
        {
            "transformer_blocks.18.attn.to_out.0": (torch.zeros(3072, 16), torch.zeros(16, 3072)),
            "single_transformer_blocks.37.proj_out": (torch.zeros(3072, 4), torch.zeros(4, 15360)),
        },
    )
    assert inspect_adapter(real_sized, flux_dev).fits_base is True
    tiny_info = inspect_adapter(files["2k"], flux_dev)
    assert tiny_info.fits_base is False
    assert "adapter is 32 x 32, the layer is 3072 x 3072" in tiny_info.problems[0]
    # The schnell architecture has no guidance embedder.
    guidance = save_lora(
        tmp_path / "guidance.safetensors",
        {"time_text_embed.guidance_embedder.linear_1": (torch.zeros(3072, 2), torch.zeros(2, 256))},
    )
    assert inspect_adapter(guidance, flux_dev).fits_base is True
    assert inspect_adapter(guidance, shape_transformer("black-forest-labs/FLUX.1-schnell")).fits_base is False


def test_convert_with_a_float32_model_folder_is_exact(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's float32 base converts exactly: the SVD sees the stored weights, not a bfloat16 copy.

    The reference is written out here from URAE's formulas (numpy SVD in float64): fuse the 2K LoRA,
    drop the r smallest singular components, add the trained B A.
    """
    import numpy as np
    from safetensors.numpy import load_file

    from urae.cli import main
    from urae.models import stored_dtype

    folder = tmp_path / "my-flux"
    pipe = build_tiny_pipeline("tiny")
    # Weights with more precision than bfloat16 holds, as a fine-tuned float32 model has.
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    pipe.save_pretrained(folder)
    assert stored_dtype(str(folder)) == torch.float32
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(files["4k"]), "--base-lora", str(files["2k"]), "--model", str(folder),
                 "-o", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()

    weights = {k: v.astype(np.float64) for k, v in load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors").items()}
    lora_2k = {k: v.astype(np.float64) for k, v in load_file(files["2k"]).items()}
    minor = {k: v.astype(np.float64) for k, v in load_file(files["4k"]).items()}
    converted = {k: v.astype(np.float64) for k, v in load_file(out).items()}

    def expected(module: str, base: np.ndarray) -> np.ndarray:
        w = base + lora_2k[f"transformer.{module}.lora_B.weight"] @ lora_2k[f"transformer.{module}.lora_A.weight"]
        block, _, name = module.rpartition(".attn.")
        short = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}[name]
        a = minor[f"{block}.attn.processor.to_{short}_a.weight"]
        b = minor[f"{block}.attn.processor.to_{short}_b.weight"]
        r = a.shape[0]
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        return w - (u[:, -r:] * s[-r:]) @ vh[-r:] + b @ a

    worst = worst_bf16 = 0.0
    for module in minor_component_targets(pipe.transformer):
        base = weights[f"{module}.weight"]
        served = base + converted[f"transformer.{module}.lora_B.weight"] @ converted[f"transformer.{module}.lora_A.weight"]
        worst = max(worst, float(np.abs(served - expected(module, base)).max()))
        # What the conversion gave when it loaded every model in bfloat16: the split of another weight.
        rounded = torch.from_numpy(base).to(torch.bfloat16).double().numpy()
        old_delta = expected(module, rounded) - rounded
        worst_bf16 = max(worst_bf16, float(np.abs(base + old_delta - expected(module, base)).max()))
    assert worst <= 1e-4
    assert worst_bf16 > 1e-4, "the float32 weights must matter for this test to mean anything"


def test_stored_dtype_reads_the_weights_headers(tmp_path: Path) -> None:
    """float16 is neither the tiny models' float32 nor the bfloat16 assumed for an uncached hub id: only
    the headers can give it. A file mixing dtypes is read as the widest of them."""
    from safetensors.torch import save_file

    from urae.models import HUB_WEIGHTS_DTYPE, stored_dtype

    pipe = build_tiny_pipeline("tiny")
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        pipe.transformer.to(dtype).save_pretrained(tmp_path / name / "transformer")
        assert stored_dtype(str(tmp_path / name)) == dtype
        single = tmp_path / name / "transformer" / "diffusion_pytorch_model.safetensors"
        assert stored_dtype(str(single)) == dtype
    mixed = tmp_path / "mixed.safetensors"
    save_file({"a": torch.zeros(2, dtype=torch.float16), "norm": torch.zeros(2, dtype=torch.float32)}, str(mixed))
    assert stored_dtype(str(mixed)) == torch.float32
    assert stored_dtype("tiny") == torch.float32
    assert stored_dtype("no-such-org/no-such-model") == HUB_WEIGHTS_DTYPE


def test_inspect_and_builtin_take_built_in_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``urae inspect urae-2k`` takes the names ``convert --base-lora`` takes; ``urae builtin`` writes the file."""
    from urae.cli import main

    assert main(["inspect", "urae-4k", "--model", "tiny"]) == 0
    report = capsys.readouterr().out
    assert "rank:       16 (exported as a plain LoRA of rank 48)" in report and "base model: fits tiny" in report

    out = tmp_path / "my-style.safetensors"
    assert main(["builtin", "urae-2k", "--model", "tiny", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    info = inspect_adapter(out, build_tiny_pipeline("tiny").transformer)
    assert info.fits_base and info.rank == 16 and info.metadata.get("urae_builtin") == "urae-2k"

    # A path that is neither a file nor a built-in name: one line that says both.
    assert main(["inspect", "urae-8k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0] and "urae-2k" in err[0]
