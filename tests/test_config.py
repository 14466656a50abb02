from pathlib import Path

import pytest

from tunesmith.config import Config, ConfigError, load_config

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_three_mistakes_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "method: qlora\ntrian: {lr: 1e-4}\ntrain: {lr: fast}\ndata: {train: x.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert len(problems) == 3, problems
    text = str(err.value)
    assert "trian: unknown key; did you mean 'train'?" in text
    assert "train.lr: expected float, got 'fast'" in text
    assert "method: 'qlora' is not one of lora, full" in text
    assert str(path) in text


def test_nested_unknown_key_gets_dotted_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: x}\ntrain: {early_stoping: {patience: 2}, batch_sise: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.early_stoping: unknown key; did you mean 'train.early_stopping'?" in str(err.value)
    assert "train.batch_sise: unknown key; did you mean 'train.batch_size'?" in str(err.value)


def test_other_tools_names_for_our_settings_are_suggested(tmp_path: Path) -> None:
    """transformers'/PEFT's names, too far from ours for spelling to find (a newcomer's --set)."""
    path = write(tmp_path, "data: {train: x}\ntrain: {learning_rate: 0.001, num_train_epochs: 2}\nlora: {rank: 4, lora_alpha: 8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for wrong, right in [("train.learning_rate", "train.lr"), ("train.num_train_epochs", "train.epochs"),
                         ("lora.rank", "lora.r"), ("lora.lora_alpha", "lora.alpha")]:
        assert f"{wrong}: unknown key; did you mean '{right}'?" in text


def test_overrides_and_types(tmp_path: Path) -> None:
    path = write(tmp_path, "data: {train: x}\ntrain: {lr: 3e-4}\n")  # YAML 1.1 reads 3e-4 as text
    cfg = load_config(path, ["train.lr=1e-3", "train.early_stopping.patience=5", "lora.target_modules=[q_proj, v_proj]"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.early_stopping.patience == 5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="train.batch_size: expected int, got 'x'"):
        load_config(path, ["train.batch_size=x"])


def test_value_checks(tmp_path: Path) -> None:
    path = write(tmp_path, "task: classification\ndata: {train: x}\ntrain: {batch_size: 0, precision: fp8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "data.labels: required for classification" in text
    assert "train.batch_size: must be >= 1" in text
    assert "train.precision: 'fp8' is not one of auto, bf16, fp32" in text


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))


def test_data_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.jsonl").write_text("{}\n")
    cfg = load_config(write(tmp_path, "data: {train: d/t.jsonl}\n"))
    assert Path(cfg.data.train) == (tmp_path / "d" / "t.jsonl").resolve()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_example_config_is_valid(path: Path) -> None:
    cfg = load_config(path)
    for data in [t.data for t in cfg.tasks] or [cfg.data]:  # a multi-task config: each task's data
        assert Path(data.train).exists()  # a file, or a folder of files (AESLC)
        for extra in (data.validation, data.test):
            assert extra is None or Path(extra).exists()


def test_new_data_and_eval_settings_are_validated_all_at_once():
    from tunesmith.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(data={"task": "text", "method": "prompt",
                          "data": {"train": "x", "delimiter": ";;", "truncation_side": "mid", "references": ["a"],
                                   "test_columns": {"output": "b"}},
                          "eval": {"metric": "accuracy"}})
    problems = "\n".join(err.value.problems)
    for expected in ("method: prompt needs a task with answers", "data.delimiter: ';;' must be one character",
                     "data.truncation_side: 'mid' is not one of middle, left, right",
                     "data.references: only generation tasks", "data.test_columns: there is no data.test file",
                     "eval.metric: 'accuracy' is not measured for task text"):
        assert expected in problems, expected
    assert len(err.value.problems) == 6


def test_chat_template_names_and_column_roles_are_checked():
    from tunesmith.config import CHAT_TEMPLATES, ROLES
    from tunesmith.data.layouts import SYNONYMS
    from tunesmith.data.render import TEMPLATES

    assert set(CHAT_TEMPLATES) == set(TEMPLATES) and set(ROLES) == set(SYNONYMS)
    with pytest.raises(ConfigError) as err:
        load_config(data={"data": {"train": "x", "chat_template": "chatm1", "columns": {"txt": "a", "output": "b"}}})
    assert err.value.problems == [
        "data.chat_template: 'chatm1' is neither a template name (chatml, alpaca, gemma) nor a Jinja template; did you mean 'chatml'?",
        "data.columns.txt: unknown role; did you mean 'text'? (roles: text, label, instruction, input, output, prompt, "
        "completion, messages, chosen, rejected)"]
    assert load_config(data={"data": {"train": "x", "chat_template": "{{ messages }}"}}).data.chat_template == "{{ messages }}"


@pytest.mark.parametrize("given,expected", [(",", ","), ("#", "#"), ("|", "|"), ("\\t", "\\t"), ("tab", "tab"),
                                            ("null", None), ("", None), ("3", 3), ("[q_proj, v_proj]", ["q_proj", "v_proj"])])
def test_set_values_that_yaml_gives_a_meaning_are_taken_as_typed(given, expected):
    from tunesmith.config import _override_value

    assert _override_value(given) == expected


def test_yes_and_no_label_keys_stay_text(tmp_path):
    path = write(tmp_path, "task: classification\ndata: {train: x, labels: {yes: spam, no: ham}}\n")
    cfg = load_config(path, ["data.delimiter=,"])
    assert cfg.data.labels == {"yes": "spam", "no": "ham"} and cfg.data.delimiter == ","
    with pytest.raises(ConfigError, match="eval.compare_with_base: expected bool, got 'yes'"):
        load_config(write(tmp_path, "data: {train: x}\neval: {compare_with_base: yes}\n"))


def test_problems_from_command_line_overrides_say_so(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: t.jsonl\ntrain:\n  epochs: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.lr=abc", "train.bach_size=3"])
    problems = e.value.problems
    assert "train.lr: expected float, got 'abc' (from --set train.lr=abc)" in problems
    assert any(p.startswith("train.bach_size: unknown key; did you mean 'train.batch_size'?")
               and p.endswith("(from --set train.bach_size=3)") for p in problems)
    assert any(p.startswith("train.epochs") and "--set" not in p for p in problems)  # the file's own problem
