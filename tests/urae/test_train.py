"""URAE training on the tiny model: loss goes down, SVD init is exact, export is exact, resume is exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook

from urae.errors import DatasetError, InvalidSpecError, TrainingCanceled
from urae.tiny import build_tiny_pipeline
from urae.train import TrainConfig, TrainProgress, load_recipe, train
from urae.train.adapter_layers import fuse_lora, install_adapters, load_trainable_state, resolve_targets
from urae.train.checkpoints import list_checkpoints, load_checkpoint
from urae.train.flow_matching import flow_matching_loss


def make_dataset(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Deterministic striped images with JSON captions (prompt + generated prompt)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([(x * (i + 1) * 2) % 256, (y * 3) % 256, ((x + y) * (i + 2)) % 256], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img{i}.png")
        caption = {"prompt": f"pattern {i}", "generated_prompt": f"a colorful stripe pattern number {i}"}
        (folder / f"img{i}.json").write_text(json.dumps(caption))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", [(128, 128), (128, 96), (96, 128), (128, 128)])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the tests: the cache is keyed by a fingerprint, so runs with equal data reuse it.
    return tmp_path_factory.mktemp("cache")


def tiny_config(dataset: Path, output: Path, cache_dir: Path, **overrides: object) -> TrainConfig:
    data: dict[str, object] = {
        "model_id": "tiny",
        "dataset_dir": str(dataset),
        "output_dir": str(output),
        "cache_dir": str(cache_dir),
        "adapter_kind": "lora",
        "rank": 4,
        "resolution": 128,
        "max_sequence_length": 64,
        "steps": 6,
        "learning_rate": 1e-2,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "device": "cpu",
        "checkpoint_every": 0,
        "sample_every": 0,
        "progress_bar": False,
    }
    data.update(overrides)
    return TrainConfig.from_dict(data)


def fixed_eval_loss(transformer: torch.nn.Module, seed: int = 123) -> float:
    """Flow-matching loss of the training image 0 on fixed noise and noise levels."""
    from urae.data.cache import encode_posterior, encode_prompt

    pipe = build_tiny_pipeline("tiny")
    with Image.open(EVAL_IMAGE[0]) as img:
        mean, _ = encode_posterior(pipe.vae, img.convert("RGB"))
    embeds, pooled = encode_prompt(pipe, EVAL_IMAGE[1], 64)
    latents = (mean[None] - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for sigma in (0.2, 0.5, 0.8):
            noise = torch.randn(latents.shape, generator=generator)
            total += float(
                flow_matching_loss(transformer, latents, embeds[None], pooled[None], torch.tensor([sigma]), noise, 1.0)
            )
    return total / 3


EVAL_IMAGE: list = []


def test_lora_training_lowers_the_loss_and_the_export_carries_it(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    EVAL_IMAGE[:] = [dataset / "img0.png", "a colorful stripe pattern number 0"]
    config = tiny_config(dataset, tmp_path / "out", cache_dir, steps=40, seed=1)
    seen: list[TrainProgress] = []
    result = train(config, on_progress=seen.append)

    losses = [json.loads(line)["loss"] for line in result.loss_log.read_text().splitlines()]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    assert {p.stage for p in seen} == {"cache", "train", "export"}
    assert [p.step for p in seen if p.stage == "train"] == list(range(1, 41))

    # The exported plain LoRA, loaded on a fresh base model, fits the data better than the base.
    base = build_tiny_pipeline("tiny")
    before = fixed_eval_loss(base.transformer)
    base.load_lora_weights(str(result.adapter_path))
    after = fixed_eval_loss(base.transformer)
    assert after < 0.9 * before


def test_minor_component_init_reproduces_the_original_model() -> None:
    pipe = build_tiny_pipeline("tiny")
    transformer = pipe.transformer
    original = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    inputs = transformer_inputs()
    with torch.no_grad():
        expected = transformer(**inputs, return_dict=False)[0]
    paths = resolve_targets(transformer, "urae")
    assert len(paths) == 2 * 4 + 2 * 3  # to_q/k/v/out.0 of the double blocks, to_q/k/v of the single ones
    layers = install_adapters(transformer, "minor_components", paths, rank=4)
    for path, layer in layers.items():
        rebuilt = layer.base_layer.weight + layer.lora_B @ layer.lora_A
        torch.testing.assert_close(rebuilt, original[f"{path}.weight"], atol=1e-6, rtol=0)
        # The base keeps the major part: it really changed.
        assert (layer.base_layer.weight - original[f"{path}.weight"]).abs().max() > 1e-4
    with torch.no_grad():
        actual = transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def transformer_inputs(seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 64, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 12, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.6]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(8), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
        .reshape(-1, 3)[:64],
        "txt_ids": torch.zeros(12, 3),
        "guidance": torch.tensor([3.5]),
    }


def test_minor_component_export_on_a_fused_base_is_exact(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    # URAE's 4K setup in small: start from the base with the (tiny) 2K LoRA fused, train minor
    # components, export one plain LoRA for the ORIGINAL weights.
    config = tiny_config(
        dataset, tmp_path / "out", cache_dir, adapter_kind="minor_components", base_adapter="urae-2k", steps=5
    )
    result = train(config)
    with safe_open(str(result.adapter_path), framework="pt") as f:
        metadata = f.metadata()
        rank = f.get_tensor("transformer.transformer_blocks.0.attn.to_q.lora_A.weight").shape[0]
    assert metadata["base_model"] == "tiny" and metadata["steps"] == "5" and metadata["adapter_kind"] == "minor_components"
    assert len(metadata["data_hash"]) == 16
    assert rank == 4 + 4 + 16  # B A, -B0 A0 and the fused 2K LoRA (rank 16)
    # The rank asked for is the rank reported; the served rank is shown beside it.
    from urae.adapters.cli import format_info
    from urae.adapters.formats import inspect_adapter

    info = inspect_adapter(result.adapter_path)
    assert (info.trained_rank, info.rank) == (4, 24)
    assert "rank:       4 (exported as a plain LoRA of rank 24)" in format_info(info, None)

    # The trained model, rebuilt exactly as training built it, from its final checkpoint.
    from urae.adapters.builtin import resolve_adapter
    from urae.adapters.formats import load_adapter_layers

    trained = build_tiny_pipeline("tiny").transformer
    lora_2k = load_adapter_layers(resolve_adapter("urae-2k", "tiny"))[1]
    targets = resolve_targets(trained, "urae")
    fuse_lora(trained, {k: v for k, v in lora_2k.items() if k not in targets})
    layers = install_adapters(
        trained, "minor_components", targets, rank=4, fused={k: v for k, v in lora_2k.items() if k in targets}
    )
    step, folder = list_checkpoints(config.output_dir)[-1]
    assert step == 5
    load_trainable_state(layers, load_checkpoint(folder)[0])
    assert any((layer.lora_A - layer.initial_A).abs().max() > 1e-6 for layer in layers.values())

    fresh = build_tiny_pipeline("tiny")
    fresh.load_lora_weights(str(result.adapter_path))
    inputs = transformer_inputs()
    with torch.no_grad():
        expected = trained(**inputs, return_dict=False)[0]
        actual = fresh.transformer(**inputs, return_dict=False)[0]
        plain = build_tiny_pipeline("tiny").transformer(**inputs, return_dict=False)[0]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert (plain - expected).abs().max() > 1e-3  # the adapter matters, so the comparison means something


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_resume_after_cancel_equals_an_uninterrupted_run(
    dataset: Path, cache_dir: Path, tmp_path: Path, optimizer: str
) -> None:
    if optimizer == "prodigy":
        pytest.importorskip("prodigyopt")
    settings = {"steps": 6, "optimizer": optimizer, "schedule": "cosine", "warmup": 1, "checkpoint_every": 2, "learning_rate": None if optimizer == "prodigy" else 1e-2}
    straight = train(tiny_config(dataset, tmp_path / "straight", cache_dir, **settings))

    config = tiny_config(dataset, tmp_path / "resumed", cache_dir, **settings)
    done: list[int] = []
    with pytest.raises(TrainingCanceled) as canceled:
        train(config, on_progress=lambda p: done.append(p.step) if p.stage == "train" else None, should_cancel=lambda: len(done) >= 3)
    assert canceled.value.step == 3
    assert [s for s, _ in list_checkpoints(config.output_dir)] == [2, 3]
    resumed = train(config)

    straight_log = [json.loads(line) for line in straight.loss_log.read_text().splitlines()]
    resumed_log = [json.loads(line) for line in resumed.loss_log.read_text().splitlines()]
    assert [e["step"] for e in resumed_log] == list(range(1, 7))
    for a, b in zip(straight_log, resumed_log, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    with safe_open(str(straight.adapter_path), framework="pt") as f1, safe_open(str(resumed.adapter_path), framework="pt") as f2:
        for key in f1.keys():
            torch.testing.assert_close(f1.get_tensor(key), f2.get_tensor(key), atol=1e-6, rtol=0)


def test_cancel_while_caching_keeps_the_finished_items(dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(dataset, tmp_path / "out", tmp_path / "cache")
    with pytest.raises(TrainingCanceled) as canceled:
        train(config, should_cancel=lambda: True)
    assert canceled.value.step == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_prodigy_without_its_package_is_a_clear_error(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # what an environment without it looks like
    config = tiny_config(dataset, tmp_path / "out", tmp_path / "cache", optimizer="prodigy")
    with pytest.raises(InvalidSpecError, match=r"prodigyopt.*urae-serve\[train\]"):
        train(config)
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_divergence_stops_with_a_clear_error(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(dataset, tmp_path / "out", cache_dir, steps=20, learning_rate=1e30, grad_clip=0.0)
    with pytest.raises(InvalidSpecError, match="diverged"):
        train(config)
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_resume_refuses_a_checkpoint_made_with_other_settings(dataset: Path, cache_dir: Path, tmp_path: Path) -> None:
    train(tiny_config(dataset, tmp_path / "out", cache_dir, steps=2))
    with pytest.raises(InvalidSpecError, match="rank"):
        train(tiny_config(dataset, tmp_path / "out", cache_dir, steps=4, rank=2))


def test_bad_dataset_is_reported_before_any_training(tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "ds", [(128, 128), (128, 128)])
    (folder / "img1.json").unlink()
    config = tiny_config(folder, tmp_path / "out", tmp_path / "cache")
    with pytest.raises(DatasetError, match="img1.png"):
        train(config)
    assert not (tmp_path / "out").exists()


def test_samples_bf16_checkpointing_and_high_res_attention_run(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(
        dataset,
        tmp_path / "out",
        tmp_path / "cache",
        steps=2,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        ntk_factor=10.0,
        proportional_attention=True,
        sample_every=2,
        sample_steps=2,
        sample_prompts=["a stripe pattern"],
        timestep_sampling="logit_normal",
        guidance=2.0,
    )
    result = train(config)
    assert np.isfinite(result.final_loss)
    assert any("URAE fixes it to 1" in r.getMessage() for r in caplog.records)  # guideline 3 warning
    with Image.open(tmp_path / "out" / "samples" / "step-000002-0.png") as sample:
        assert sample.size == (128, 128)


def test_config_validation_names_the_field() -> None:
    base = {"dataset_dir": "d", "output_dir": "o"}
    with pytest.raises(InvalidSpecError) as err:
        TrainConfig.from_dict({**base, "learning_rat": 1.0})
    assert err.value.field == "learning_rat"
    for key, value in [("rank", 0), ("optimizer", "sgd"), ("resolution", 1000), ("real_prompt_ratio", 1.5), ("steps", "10")]:
        with pytest.raises(InvalidSpecError) as err:
            TrainConfig.from_dict({**base, key: value})
        assert err.value.field == key
    with pytest.raises(InvalidSpecError, match="alpha"):
        TrainConfig.from_dict({**base, "adapter_kind": "minor_components", "alpha": 32})
    with pytest.raises(InvalidSpecError, match="dataset_dir"):
        TrainConfig.from_dict({"output_dir": "o"})
    assert TrainConfig.from_dict({**base, "learning_rate": "1e-4"}).learning_rate == 1e-4  # YAML reads 1e-4 as text
    config = TrainConfig.from_dict(base)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert (config.rank, config.targets, config.guidance, config.resolution) == (16, "urae", 1.0, 2048)


def test_recipes_follow_the_paper() -> None:
    two_k = TrainConfig.from_dict({**load_recipe("urae-2k"), "dataset_dir": "d", "output_dir": "o"})
    assert (two_k.adapter_kind, two_k.rank, two_k.lora_scale, two_k.targets) == ("lora", 16, 1.0, "urae")
    assert (two_k.optimizer, two_k.effective_learning_rate, two_k.schedule, two_k.grad_clip) == ("prodigy", 1.0, "constant", 1.0)
    assert (two_k.mixed_precision, two_k.gradient_checkpointing, two_k.steps, two_k.resolution) == ("bf16", True, 2000, 2048)
    four_k = TrainConfig.from_dict({**load_recipe("urae-4k"), "dataset_dir": "d", "output_dir": "o"})
    assert (four_k.adapter_kind, four_k.rank, four_k.base_adapter, four_k.steps) == ("minor_components", 16, "urae-2k", 10000)
    assert (four_k.ntk_factor, four_k.proportional_attention, four_k.resolution, four_k.guidance) == (10.0, True, 4096, 1.0)
    with pytest.raises(InvalidSpecError, match="urae-2k"):
        load_recipe("urae-8k")


def test_train_cli_takes_a_recipe_with_overrides(dataset: Path, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from urae.cli import main

    argv = ["train", "--config", "urae-2k", "--dataset", str(dataset), "--output", str(tmp_path / "out"), "--model", "tiny", "--steps", "2"]
    sets = {"rank": 2, "resolution": 128, "max_sequence_length": 64, "mixed_precision": "no", "device": "cpu", "gradient_checkpointing": "false", "progress_bar": "false", "sample_every": 0, "cache_dir": str(cache_dir)}
    argv += [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    assert main(argv) == 0
    with safe_open(str(tmp_path / "out" / "adapter.safetensors"), framework="pt") as f:
        assert f.metadata()["recipe"] == "urae-2k"
        assert f.get_tensor("transformer.single_transformer_blocks.1.attn.to_v.lora_A.weight").shape[0] == 2
    assert main(argv[:9] + ["--set", "rnak=2"]) == 2
    assert "rnak: is not a training parameter" in capsys.readouterr().err


# The reference's training settings (URAE.md), written out here rather than read from the project.
REFERENCE_PRODIGY = {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4, "decouple": True,
                     "use_bias_correction": True, "safeguard_warmup": True}
REFERENCE_GLOBAL_BATCH = 8


class StepObserver:
    """Watches a real training run: samples through the transformer, and each optimizer step."""

    def __init__(self) -> None:
        self.samples_since_step = 0
        self.samples_per_step: list[int] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    def __enter__(self) -> StepObserver:
        from diffusers import FluxTransformer2DModel

        def on_forward(module: torch.nn.Module, _args: object, output: object) -> None:
            if isinstance(module, FluxTransformer2DModel) and module.training:
                sample = output[0] if isinstance(output, tuple) else output.sample  # type: ignore[attr-defined]
                self.samples_since_step += sample.shape[0]

        def on_step(optimizer: torch.optim.Optimizer, _args: object, _kwargs: object) -> None:
            self.optimizers.append(optimizer)
            self.samples_per_step.append(self.samples_since_step)
            self.samples_since_step = 0

        self._handles = [
            torch.nn.modules.module.register_module_forward_hook(on_forward),
            register_optimizer_step_pre_hook(on_step),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def recipe_config(name: str, dataset: Path, output: Path, cache_dir: Path, **overrides: object) -> TrainConfig:
    """A shipped recipe at tiny scale: only the size, precision and device settings are changed."""
    small = {"model_id": "tiny", "dataset_dir": str(dataset), "output_dir": str(output), "cache_dir": str(cache_dir),
             "rank": 2, "resolution": 128, "max_sequence_length": 64, "steps": 2, "mixed_precision": "no",
             "gradient_checkpointing": False, "device": "cpu", "sample_every": 0, "checkpoint_every": 0,
             "progress_bar": False}
    return TrainConfig.from_dict({**load_recipe(name), **small, **overrides})


@pytest.mark.parametrize("recipe", ["urae-2k", "urae-4k"])
def test_recipes_run_prodigy_and_the_global_batch_of_the_reference(
    recipe: str, dataset: Path, cache_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("prodigyopt")
    overrides = {"ntk_factor": 1.0, "proportional_attention": False} if recipe == "urae-4k" else {}
    with StepObserver() as seen:
        train(recipe_config(recipe, dataset, tmp_path / "out", cache_dir, **overrides))
    # One process here: 8 passes of one image make each of the two steps.
    assert seen.samples_per_step == [REFERENCE_GLOBAL_BATCH, REFERENCE_GLOBAL_BATCH]
    optimizer = seen.optimizers[0]
    assert type(optimizer).__name__ == "Prodigy"
    for group in optimizer.param_groups:
        for key, value in REFERENCE_PRODIGY.items():
            assert group[key] == value, key


def test_accumulation_keeps_the_global_batch_at_any_batch_size(tmp_path: Path) -> None:
    squares = make_dataset(tmp_path / "squares", [(128, 128)] * 4)  # one bucket: every pass is full
    with StepObserver() as seen:
        train(recipe_config("urae-2k", squares, tmp_path / "out", tmp_path / "cache", batch_size=2, optimizer="adamw",
                            learning_rate=1e-3))
    assert seen.samples_per_step == [REFERENCE_GLOBAL_BATCH, REFERENCE_GLOBAL_BATCH]
    optimizer = seen.optimizers[0]
    assert type(optimizer).__name__ == "AdamW"
    assert (optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]) == ((0.9, 0.999), 1e-8)
    with StepObserver() as seen:
        train(tiny_config(squares, tmp_path / "plain", tmp_path / "cache", steps=2, batch_size=2))
    assert seen.samples_per_step == [2, 2]  # no global batch set: one pass per step


def test_accumulation_steps_per_process_count() -> None:
    config = TrainConfig.from_dict({**load_recipe("urae-2k"), "dataset_dir": "d", "output_dir": "o"})
    for processes in (1, 2, 4, 8):
        assert config.accumulation_steps(processes) * processes * config.batch_size == REFERENCE_GLOBAL_BATCH
    with pytest.raises(InvalidSpecError, match="global_batch_size"):
        config.accumulation_steps(3)
    with pytest.raises(InvalidSpecError, match="global_batch_size"):
        TrainConfig.from_dict({"dataset_dir": "d", "output_dir": "o", "batch_size": 3, "global_batch_size": 8})


def test_minor_components_of_a_fused_base_are_split_before_any_rounding() -> None:
    """In a bfloat16 model, the split sees W + B2k A2k unrounded; only the major part is rounded."""
    from urae.adapters.builtin import resolve_adapter
    from urae.adapters.formats import load_adapter_layers

    rank = 4
    transformer = build_tiny_pipeline("tiny", dtype=torch.bfloat16).transformer
    targets = resolve_targets(transformer, "urae")
    lora_2k = load_adapter_layers(resolve_adapter("urae-2k", "tiny"))[1]
    originals = {p: transformer.get_submodule(p).weight.detach().double().numpy() for p in targets}
    layers = install_adapters(transformer, "minor_components", targets, rank, fused={p: lora_2k[p] for p in targets})

    worst = worst_rounded = 0.0
    for path, layer in layers.items():
        up, down = (t.double().numpy() for t in lora_2k[path])
        exact = originals[path] + up @ down
        u, s, vh = np.linalg.svd(exact, full_matrices=False)
        minor = (u[:, -rank:] * s[-rank:]) @ vh[-rank:]
        init = (layer.initial_B.double() @ layer.initial_A.double()).numpy()
        worst = max(worst, float(np.abs(init - minor).max()))
        assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
        # What splitting the bfloat16-rounded sum gives instead.
        rounded = torch.from_numpy(exact).to(torch.bfloat16).double().numpy()
        u, s, vh = np.linalg.svd(rounded, full_matrices=False)
        worst_rounded = max(worst_rounded, float(np.abs((u[:, -rank:] * s[-rank:]) @ vh[-rank:] - minor).max()))
    assert worst < 1e-5
    assert worst_rounded > 1e-4, "rounding must matter at this size for the test to mean anything"


def test_a_float32_base_trained_in_bf16_is_split_from_its_float32_weights(dataset: Path, tmp_path: Path) -> None:
    """The frozen base is bf16, but the minor components are those of the weights as stored."""
    rank = 4
    pipe = build_tiny_pipeline("tiny")
    with torch.no_grad():  # float32 weights that bf16 cannot hold, as a fine-tuned base has
        for p in pipe.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1e-3)
    folder = tmp_path / "my-flux"
    pipe.save_pretrained(folder)
    weights = {k: v.double().numpy() for k, v in pipe.transformer.state_dict().items()}
    # A learning rate so small that the trained factors are the initial ones to ~1e-12.
    config = tiny_config(dataset, tmp_path / "out", tmp_path / "cache", model_id=str(folder), adapter_kind="minor_components",
                         rank=rank, steps=1, mixed_precision="bf16", learning_rate=1e-12)
    train(config)
    state = load_checkpoint(list_checkpoints(config.output_dir)[-1][1])[0]

    worst = worst_rounded = 0.0
    for path in resolve_targets(pipe.transformer, "urae"):
        w = weights[f"{path}.weight"]
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        minor = (u[:, -rank:] * s[-rank:]) @ vh[-rank:]
        init = (state[f"{path}.lora_B"].double() @ state[f"{path}.lora_A"].double()).numpy()
        worst = max(worst, float(np.abs(init - minor).max()))
        rounded = torch.from_numpy(w).to(torch.bfloat16).double().numpy()
        u, s, vh = np.linalg.svd(rounded, full_matrices=False)
        worst_rounded = max(worst_rounded, float(np.abs((u[:, -rank:] * s[-rank:]) @ vh[-rank:] - minor).max()))
    assert worst < 1e-5
    assert worst_rounded > 1e-4, "rounding must matter at this size for the test to mean anything"


def test_the_documented_fine_tune_defaults_are_the_real_ones() -> None:
    """docs/api.md and README say what a fine-tune without a named recipe trains: the TrainConfig defaults."""
    import dataclasses
    import re

    root = Path(__file__).resolve().parents[2]
    api = (root / "docs" / "api.md").read_text()
    paragraph = api.split("The defaults (those\nof `urae train` without a config): ", 1)[1].split(". The adapter", 1)[0]
    documented = dict(re.findall(r"`(\w+)` `?([\w.]+)`?", paragraph))
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    assert len(documented) >= 8, documented
    for key, text in documented.items():
        real = defaults[key]
        if key == "learning_rate" and real is None:
            real = TrainConfig(dataset_dir=Path("."), output_dir=Path(".")).effective_learning_rate
        assert text == ("none" if real is None else str(real)) or float(text) == real, (key, text, real)
    export_rank = 2 * defaults["rank"]
    assert f"rank 2 x `rank`\n({export_rank})" in api
    readme = (root / "README.md").read_text()
    assert (f"without a named recipe it tunes\nthe minor components (rank {defaults['rank']}, AdamW at 1e-4, "
            f"{defaults['steps']} steps at {defaults['resolution']} px; served as a rank-{export_rank} LoRA)") in readme


def test_a_training_log_carries_no_known_harmless_library_warnings(dataset: Path, tmp_path: Path) -> None:
    """What a fine-tune worker's log shows for a run with the defaults' bf16 weights: neither transformers'
    note that an image processor (never used here) falls back without torchvision, nor diffusers'
    "should be kept in float32: []" for models that keep nothing in float32. Other warnings still show."""
    import os
    import subprocess

    script = f"""
import logging, sys
logging.basicConfig(level=logging.INFO)
import worker.jobs  # what a fine-tune worker imports first
from urae.train import TrainConfig, train
config = TrainConfig.from_dict({{"model_id": "tiny", "dataset_dir": {str(dataset)!r}, "output_dir": {str(tmp_path / 'out')!r},
    "adapter_kind": "lora", "rank": 2, "resolution": 128, "max_sequence_length": 64, "steps": 1,
    "gradient_checkpointing": False, "device": "cpu", "checkpoint_every": 0, "sample_every": 0,
    "progress_bar": False}})
assert config.mixed_precision == "bf16"
train(config)
logging.getLogger("diffusers.models.modeling_utils").warning("There are modules in X that should be kept in float32: ['w'].")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "requires torchvision" not in proc.stderr, proc.stderr[-3000:]
    assert "kept in float32: []" not in proc.stderr, proc.stderr[-3000:]
    assert "kept in float32: ['w']" in proc.stderr  # a warning that means something still shows
