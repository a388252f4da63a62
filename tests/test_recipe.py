import pytest
from conftest import ROOT, write_recipe
from helpers import run_cli
from pydantic import ValidationError

from pipeline.contracts import load_contract
from pipeline.env import Env
from pipeline.recipe import Recipe, RecipeError, load_recipe

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
CONTRACTS = sorted((ROOT / "data_contracts").rglob("*.yaml"))
GPU_ENV = Env(
    cuda=True,
    gpu_name="A100",
    gpu_memory_gb=80.0,
    num_gpus=1,
    bf16=True,
    bitsandbytes="0.50",
    torch="2.13",
    cpu_count=2,
    world_size=1,
    platform="linux",
)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_builds_library_configs(path, tmp_path, monkeypatch):
    import transformers.training_args

    from pipeline.model import bnb_config, lora_config
    from pipeline.train import sft_config

    # SFTConfig checks the machine for bf16 support; pretend to be the GPU the recipe targets.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)

    recipe = load_recipe(path)
    assert recipe.name and recipe.task.name in {"medical_coding", "chat"}
    assert path.read_text().startswith("#"), "a recipe opens with its header comment"
    lora = lora_config(recipe.lora)
    assert lora.r == recipe.lora.r and lora.lora_alpha == recipe.lora.alpha
    bnb = bnb_config(recipe.quantization)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == recipe.quantization.quant_type
    device = "cpu" if recipe.hardware.device == "cpu" else "cuda"
    args = sft_config(recipe, tmp_path, device, GPU_ENV)
    assert args.learning_rate == recipe.training.learning_rate
    assert args.max_length == recipe.training.max_length
    assert args.completion_only_loss is True
    assert args.bf16 == (device == "cuda") and args.optim == recipe.training.optim


@pytest.mark.parametrize("path", CONTRACTS, ids=lambda p: p.name)
def test_every_shipped_contract_loads(path):
    contract = load_contract(path)
    assert contract.fields


def test_production_recipe_is_the_70b_qlora_target():
    recipe = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    assert "70B" in recipe.model.path
    q = recipe.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.training.optim == "paged_adamw_8bit" and recipe.training.gradient_checkpointing
    assert recipe.hardware.gpu_memory_gb == 80


def test_quickstart_extends_production_and_only_swaps_model_data_and_cpu_settings():
    base = load_recipe(ROOT / "recipes" / "medical_coding.yaml")
    quick = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert "extends: medical_coding.yaml" in (ROOT / "recipes" / "quickstart.yaml").read_text()
    assert quick.task == base.task and quick.data.contract == base.data.contract
    assert quick.quantization.load_in_4bit and quick.quantization.quant_type == "nf4"
    assert quick.lora.r == base.lora.r and quick.lora.target_modules == base.lora.target_modules


def test_unknown_key_is_rejected_with_a_hint_and_the_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"extends": str(ROOT / "recipes/quickstart.yaml"), "lora": {"alpah": 8}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    (line,) = err.value.errors
    assert line.startswith(f"{path}: lora.alpah: unknown key (did you mean 'alpha'?)")


def test_all_errors_are_reported_at_once_each_with_its_source(tmp_path):
    path = write_recipe(
        tmp_path / "r.yaml",
        {
            "extends": str(ROOT / "recipes/quickstart.yaml"),
            "training": {"learning_rate": "fast", "micro_batch_size": 0},
            "modle": {},
        },
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["lora.r=-1"])
    text = "\n".join(err.value.errors)
    assert f"{path}: training.learning_rate:" in text and "'fast'" in text
    assert f"{path}: training.micro_batch_size:" in text and "greater than 0" in text
    assert "modle: unknown key (did you mean 'model'?)" in text
    assert "--set: lora.r:" in text
    assert len(err.value.errors) == 4


def test_error_in_the_parent_recipe_names_the_parent_file(tmp_path):
    parent = write_recipe(
        tmp_path / "parent.yaml",
        {"extends": str(ROOT / "recipes/quickstart.yaml"), "eval": {"batch_size": "many"}},
    )
    child = write_recipe(tmp_path / "child.yaml", {"extends": "parent.yaml", "name": "child"})
    with pytest.raises(RecipeError) as err:
        load_recipe(child)
    assert err.value.errors[0].startswith(f"{parent}: eval.batch_size:")


def test_overrides_go_through_the_same_validation_and_win():
    recipe = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        ["training.learning_rate=1e-4", "data.train=x.jsonl", "lora.target_modules=[q_proj, v_proj]"],
    )
    assert recipe.training.learning_rate == 1e-4
    assert recipe.data.train == "x.jsonl"
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="training.learnig_rate: unknown key .did you mean 'learning_rate'"):
        load_recipe(ROOT / "recipes/quickstart.yaml", ["training.learnig_rate=1"])
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(ROOT / "recipes/quickstart.yaml", ["training.learning_rate"])
    # A section only --set made up is the command line's mistake, and the error says so (not the recipe file).
    with pytest.raises(RecipeError, match=r"^--set: foo: unknown key"):
        load_recipe(ROOT / "recipes/quickstart.yaml", ["foo.bar=1"])


def test_recipe_is_frozen():
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml")
    with pytest.raises(ValidationError):
        recipe.lora.r = 4  # type: ignore[misc]
    assert isinstance(recipe, Recipe)


def test_extends_cycle_and_missing_parent_are_clear(tmp_path):
    write_recipe(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_recipe(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    write_recipe(tmp_path / "c.yaml", {"extends": "nope.yaml"})
    with pytest.raises(RecipeError, match="extends: file not found: .*nope.yaml"):
        load_recipe(tmp_path / "c.yaml")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nlora: {r: 16\n")
    with pytest.raises(RecipeError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_recipe(path)


def test_cli_recipe_errors_exit_2_with_the_path_in_the_message(tmp_path):
    unknown = write_recipe(
        tmp_path / "u.yaml", {"extends": str(ROOT / "recipes/quickstart.yaml"), "lora": {"alpah": 8}}
    )
    result = run_cli("validate", str(unknown))
    assert result.returncode == 2
    assert "lora.alpah: unknown key (did you mean 'alpha'?)" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("validate", "recipes/quickstart.yaml", "--set", "training.num_epochs=lots")
    assert result.returncode == 2 and "training.num_epochs" in result.stderr

    result = run_cli(
        "validate",
        "recipes/quickstart.yaml",
        "--set",
        "data.train=missing/train.jsonl",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2
    assert "data.train: file not found: missing/train.jsonl" in result.stderr

    result = run_cli("validate", str(tmp_path / "no-such-recipe.yaml"))
    assert result.returncode == 2 and "no-such-recipe.yaml: file not found" in result.stderr
