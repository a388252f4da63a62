"""Property-based tests: random and mutated recipes, contracts and data files never end in a traceback.

Each input either loads, or fails with the project's own error types (RecipeError -> exit 2,
ContractFailed -> exit 1) whose messages name where the problem is.
"""

import json
import math
import subprocess
import sys
from copy import deepcopy

import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contracts import load_contract
from pipeline.plan import make_plan
from pipeline.recipe import RecipeError, load_recipe
from pipeline.splits import validate_split

QUICK = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
CONTRACT = yaml.safe_load((ROOT / "data_contracts" / "medical_coding.yaml").read_text())
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.text(max_size=8), max_size=3),
)
keys = st.one_of(
    st.sampled_from(
        [
            "model",
            "lora",
            "training",
            "data",
            "eval",
            "r",
            "alpha",
            "path",
            "learning_rate",
            "max_length",
            "extends",
            "name",
            "fields",
            "type",
            "items",
        ]
    ),
    st.text(min_size=1, max_size=12),
)


def paths_of(tree, prefix=()):
    if isinstance(tree, dict):
        yield prefix
        for key, value in tree.items():
            yield from paths_of(value, (*prefix, key))
    else:
        yield prefix


@st.composite
def mutated(draw, base):
    """The base document with a few keys replaced, deleted or added at random places."""
    doc = deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        places = list(paths_of(doc))
        where = draw(st.sampled_from(places))
        node = doc
        for key in where:
            node = node[key]
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "add" or not node:
            node[draw(keys)] = draw(scalars)
        else:
            key = draw(st.sampled_from(sorted(node, key=str)))
            if action == "delete":
                del node[key]
            else:
                node[key] = draw(st.one_of(scalars, st.dictionaries(keys, scalars, max_size=3)))
    return doc


def load_or_located_errors(tmp_path_factory, doc):
    """The recipe ``doc`` (without ``extends``) loaded, or None after checking every error names its file."""
    doc.pop("extends", None)
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        return load_recipe(path), path
    except RecipeError as exc:
        assert exc.errors and all(line.startswith(str(path)) for line in exc.errors)
        return None, path


@FUZZ
@given(doc=mutated(QUICK))
def test_mutated_recipes_load_or_fail_with_located_errors(tmp_path_factory, doc):
    recipe, _ = load_or_located_errors(tmp_path_factory, doc)
    if recipe is None:
        return
    plan = make_plan(recipe, 1000, None)  # a valid recipe always plans
    assert plan["optimizer_steps"] >= 1


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_as_a_recipe_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("t") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert exc.errors


@FUZZ
@given(doc=mutated(CONTRACT))
def test_mutated_contracts_load_or_fail_with_located_errors(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("c") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        contract = load_contract(path)
    except RecipeError as exc:
        assert exc.errors and all(line.startswith(str(path)) for line in exc.errors)
        return
    row = {"id": "x", "note": "Pt with essential hypertension, stable.", "codes": ["I10"]}
    result_path = path.with_suffix(".jsonl")
    result_path.write_text(json.dumps(row) + "\n")
    result = validate_split("train", result_path, contract)
    assert result.rows_in == 1 == result.rows_accepted + result.rows_quarantined


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
rows = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {"note": st.text(max_size=60), "codes": st.lists(st.text(max_size=8), max_size=4)}, optional={"id": json_values}
    ).map(json.dumps),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
    st.just('{"note": NaN}'),
    st.just(""),
    st.just("\ufeff{}"),
)


@FUZZ
@given(lines=st.lists(rows, max_size=25))
def test_any_data_file_is_split_into_accepted_and_quarantined_rows(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("d") / "split.jsonl"
    path.write_bytes(
        "".join(line.replace("\n", " ").replace("\r", " ") + "\n" for line in lines).encode("utf-8", "surrogatepass")
    )
    contract = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
    result = validate_split("train", path, contract)
    assert result.rows_in == len(lines) == result.rows_accepted + result.rows_quarantined
    for quarantined in result.quarantined:
        assert quarantined["reasons"] and all(r["message"] for r in quarantined["reasons"])
    assert all(not isinstance(v, float) or math.isfinite(v) for row in result.rows for v in row.values())


@FUZZ
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "hidden_size",
                "intermediate_size",
                "vocab_size",
                "num_hidden_layers",
                "num_attention_heads",
                "head_dim",
            ]
        ),
        st.one_of(st.integers(-5, 5000), st.text(max_size=5), st.none(), st.just("llama")),
        max_size=7,
    )
)
def test_plan_survives_any_model_config(config):
    plan = make_plan(load_recipe(ROOT / "recipes" / "quickstart.yaml"), 100, config)
    if plan["parameters"] is None:
        assert plan["parameters_unknown"].startswith("cannot count parameters")
    else:
        counts = plan["parameters"]
        assert 0 < counts["quantized"] < counts["total"] and 0 < counts["trainable"]


def test_cli_bad_inputs_exit_1_or_2_without_a_traceback(tmp_path):
    cases = {
        "binary.yaml": b"\x00\xff\xfe garbage",
        "list.yaml": b"- 1\n- 2\n",
        "deep.yaml": b"name: x\nlora: {r: {a: {b: [1, 2]}}}\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        for command in ("validate", "plan"):
            result = subprocess.run(
                [sys.executable, "-m", "pipeline", command, str(path)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode in (1, 2), (name, command, result.stderr)
            assert "Traceback" not in result.stderr and str(path) in result.stderr


# Contract v2: the same guarantee with dataset checks across splits, the PII policy, CSV input and duplicates.
FUZZ_V2 = settings(FUZZ, max_examples=25)  # each example runs two splits through every dataset check
csv_cells = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["I10", "E11.9;I10", '["E11.9"]', "E11", "[", "", "Pt with essential hypertension, stable."]),
)


@FUZZ_V2
@given(
    train_lines=st.lists(rows, max_size=15),
    eval_lines=st.lists(rows, max_size=8),
    copies=st.lists(st.integers(0, 14), max_size=4),
)
def test_train_and_eval_with_dataset_checks_reconcile(tmp_path_factory, train_lines, eval_lines, copies):
    from pipeline.splits import ContractRun

    base = tmp_path_factory.mktemp("v2")
    good = [
        json.dumps({"id": f"g{i}", "note": f"Pt {i} with essential hypertension, SSN 536-22-8726.", "codes": ["I10"]})
        for i in range(3)
    ]
    # copies of train lines planted into eval: leakage candidates
    eval_lines = eval_lines + [train_lines[i] for i in copies if i < len(train_lines)] + good[:1]
    train_lines = train_lines + good

    def write(name, lines):
        path = base / name
        path.write_bytes(
            "".join(line.replace("\n", " ").replace("\r", " ") + "\n" for line in lines).encode(
                "utf-8", "surrogatepass"
            )
        )
        return path

    contract = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
    run = ContractRun(contract)
    splits = [run.split("train", write("t.jsonl", train_lines)), run.split("eval", write("e.jsonl", eval_lines))]
    run.finish()
    for split, lines in zip(splits, (train_lines, eval_lines), strict=True):
        assert (
            split.rows_in
            == len(lines)
            == split.rows_accepted + split.rows_quarantined
            == len(split.rows) + split.rows_quarantined
        )
        assert sorted([q["row"] for q in split.quarantined] + [r["_row"] for r in split.rows]) == list(
            range(1, len(lines) + 1)
        )
        assert all("536-22-8726" not in json.dumps(r) for r in split.rows)  # redacted before it is returned
        assert all("536-22-8726" not in json.dumps(q) for q in split.quarantined)


@FUZZ_V2
@given(records=st.lists(st.lists(csv_cells, min_size=0, max_size=4), max_size=12))
def test_any_csv_file_is_split_into_accepted_and_quarantined_rows(tmp_path_factory, records):
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "note", "codes"])
    for record in records:
        writer.writerow(record)
    path = tmp_path_factory.mktemp("csv") / "split.csv"
    path.write_bytes(buffer.getvalue().encode("utf-8", "surrogatepass"))
    result = validate_split("train", path, load_contract(ROOT / "data_contracts" / "medical_coding.yaml"))
    assert result.rows_in == len(records) == result.rows_accepted + result.rows_quarantined
    for quarantined in result.quarantined:
        assert quarantined["reasons"] and all(r["message"] for r in quarantined["reasons"])


task_values = st.one_of(
    scalars,
    st.sampled_from(["label", "labels", "json", "text", "number", "chat", "note", "codes", "regex", "list"]),
    st.text(alphabet="{}ab_ note", max_size=20),
    st.lists(st.sampled_from(["micro_f1", "accuracy", "exact_match", "mae", "nope"]), max_size=3),
)
task_keys = st.sampled_from(
    [
        "preset",
        "answer",
        "target",
        "system_prompt",
        "user_prompt",
        "plain_prompt",
        "parse",
        "parse_pattern",
        "metrics",
        "tolerance",
        "vocabulary",
        "bogus",
    ]
)


@FUZZ
@given(task=st.one_of(st.dictionaries(task_keys, task_values, max_size=6), scalars))
def test_any_declared_task_is_refused_by_key_or_renders_a_row(tmp_path_factory, task):
    from pipeline.contracts import load_contract
    from pipeline.data import task_problems
    from pipeline.tasks import build_task

    recipe, path = load_or_located_errors(tmp_path_factory, {**deepcopy(QUICK), "task": task})
    if recipe is None:
        return
    contract = load_contract(ROOT / "data_contracts" / "medical_coding.yaml")
    problems = task_problems(recipe, contract, path)
    if problems:
        assert all(line.startswith(f"{path}: task.") for line in problems)
        return
    built = build_task(recipe.task, None, "icd10cm")
    row = {"note": "Type 2 diabetes.", "codes": ["E11.9"], "_row": 1}
    assert isinstance(built.user_prompt(row), str) and isinstance(built.target(row), str)
    built.score([built.gold(row)], [built.parse("E11.9")])
