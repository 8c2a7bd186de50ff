"""Config: layering (defaults < YAML < command line), typed parsing, and errors that name the field."""

import pytest

from jdpo.config import Config, ConfigError, dump, field_help, load_config, replace


def test_defaults_follow_the_dpo_literature():
    c = Config()
    assert c.dpo.beta == 0.1 and c.dpo.loss_type == ("sigmoid",) and c.dpo.reference == "cached"
    assert c.optim.learning_rate == 5e-6 and c.optim.warmup_ratio == 0.1
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay) == (0.9, 0.95, 1e-8, 0.0)
    assert c.optim.max_grad_norm == 1.0


def test_yaml_then_command_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  beta: 0.3\n  loss_type: [sigmoid, sft]\ntrain:\n  seed: 7\n  max_steps: 10\n")
    c = load_config(p, ["--dpo.beta", "0.5", "--train.max_steps=20", "--data.train", "a.jsonl,b.jsonl:0.5"])
    assert c.dpo.beta == 0.5 and c.dpo.loss_type == ("sigmoid", "sft")
    assert c.train.seed == 7 and c.train.max_steps == 20
    assert c.data.train == ("a.jsonl", "b.jsonl:0.5")


def test_dump_round_trips(tmp_path):
    c = replace(
        Config(), **{"dpo.beta": 0.25, "data.train": ["x.jsonl"], "mesh.fsdp": 4, "model.remat": "full"}
    )
    dump(c, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == c


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dpo.bta", "1"], "unknown field 'dpo.bta'; did you mean 'dpo.beta'"),
        (["--dpox.beta", "1"], "unknown field 'dpox'"),
        (["--dpo.beta", "high"], "dpo.beta: expected a number, got 'high'"),
        (["--train.max_steps", "1.5"], "train.max_steps: expected an integer"),
        (["--model.dtype", "fp16"], "model.dtype: 'fp16' is not one of"),
        (["--data.packing", "maybe"], "data.packing: expected true/false"),
        (["--dpo.reference", "none"], "need a reference"),
        (["--dpo.loss_type", "sigmoid,dpo_typo"], "dpo.loss_type: unknown ['dpo_typo']"),
        (["--dpo.loss_type", "sigmoid,sft", "--dpo.loss_weights", "1"], "dpo.loss_weights has 1 entries"),
        (["--data.max_prompt_length", "2048"], "data.max_prompt_length (2048) must be < data.max_length"),
        (["--mesh.data", "-1", "--mesh.fsdp", "-1"], "at most one of mesh"),
        (["--optim.learning_rate", "0"], "optim.learning_rate must be > 0"),
        (["--dpo.beta", "nan"], "dpo.beta: expected a finite number, got 'nan'"),
        (["--optim.learning_rate", "inf"], "optim.learning_rate: expected a finite number"),
        (["--optim.max_grad_norm", "-nan"], "optim.max_grad_norm: expected a finite number"),
        (["--dpo.loss_type", "robust", "--dpo.label_smoothing", "0.5"], "needs dpo.label_smoothing < 0.5"),
        (["--dpo.loss_type", "discopop", "--dpo.discopop_tau", "0"], "dpo.discopop_tau must be > 0"),
        (["--model.attention", "cudnn"], "model.attention=cudnn is no longer a choice"),
        (["--model.attention", "splash", "--model.attention_block", "200"], "TPU tiles are multiples of 128"),
        (
            ["--model.attention", "pallas_gpu", "--model.attention_block", "96"],
            "Triton tiles are powers of two",
        ),
        (["--model.attention_block", "-1"], "model.attention_block must be >= 0"),
        (["dpo.beta", "1"], "expected --section.field VALUE"),
        (["--dpo.beta"], "needs a value"),
    ],
)
def test_bad_values_name_the_field(args, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, args)
    assert message in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dpo:\n  betta: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field 'dpo.betta'"):
        load_config(p)
    p.write_text("dpo: 3\n")
    with pytest.raises(ConfigError, match="section 'dpo' must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_has_help():
    rows = field_help()
    assert len(rows) > 40
    for name, _tp, _default, text in rows:
        assert text and text[0].isupper(), name


def test_every_loss_option_is_a_config_field_with_the_library_default():
    """`dpo_loss`'s options are `dpo.*` fields with --help text and the library's defaults, and
    the loss spec built from them (`DPOSection.loss_spec().loss_kwargs()`) hands every one to the loss."""
    import dataclasses
    import inspect

    from jdpo.config import DPOSection
    from jdpo.losses.pairwise import dpo_loss

    # set by the caller (bco_delta: the running reward mean of the train state)
    per_call = {"chosen_lengths", "rejected_lengths", "weights", "reduction", "bco_delta"}
    options = {
        name: p.default
        for name, p in inspect.signature(dpo_loss).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in per_call
    }
    fields = {f.name: f for f in dataclasses.fields(DPOSection)}
    spec = DPOSection().loss_spec()
    assert set(spec.loss_kwargs()) == set(options)
    for name, default in options.items():
        assert name in fields and fields[name].metadata["help"], name
        got = spec.loss_kwargs()[name]
        assert got == (tuple([default]) if name == "loss_type" else default), name
    custom = load_config(None, ["--dpo.discopop_tau", "0.2", "--dpo.orpo_include_nll", "false"]).dpo
    kw = custom.loss_spec().loss_kwargs()
    assert kw["discopop_tau"] == 0.2 and kw["orpo_include_nll"] is False


def test_a_removed_field_at_its_old_value_still_loads(tmp_path):
    """Every config.yaml an older jdpo wrote holds dpo.bco_delta: 0.0; a run's own config keeps loading,
    another value is refused with the reason."""
    p = tmp_path / "c.yaml"
    p.write_text("dpo:\n  bco_delta: 0.0\n  beta: 0.2\n")
    assert load_config(p).dpo.beta == 0.2
    p.write_text("dpo:\n  bco_delta: 0.3\n")
    with pytest.raises(ConfigError, match="dpo.bco_delta is no longer a setting .*running reward mean"):
        load_config(p)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.eps", "-1"], "optim.eps must be > 0"),  # AdamW's step turned into ascent
        (["--optim.eps", "0"], "optim.eps must be > 0"),
        (["--optim.max_grad_norm", "-1"], "optim.max_grad_norm must be >= 0 (0: no clipping), got -1.0"),
        (["--optim.weight_decay", "-0.01"], "optim.weight_decay must be >= 0 (0: off"),
    ],
)
def test_optimizer_settings_that_invert_training_are_refused_with_the_valid_range(args, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert message in str(e.value)
    # The ends of each range stay valid: no clipping, no decay.
    c = load_config(None, ["--optim.max_grad_norm", "0", "--optim.weight_decay", "0", "--optim.eps", "1e-12"])
    assert (c.optim.max_grad_norm, c.optim.weight_decay, c.optim.eps) == (0.0, 0.0, 1e-12)


def test_a_yaml_key_given_twice_is_refused_naming_the_file_and_line(tmp_path):
    """Plain YAML keeps the last of two equal keys: a second `train:` section would silently drop the
    first one's settings."""
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  seed: 1\ndpo:\n  beta: 0.2\ntrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:5: key 'train' appears twice .*first at line 1"):
        load_config(p)
    p.write_text("dpo:\n  beta: 0.2\n  loss_type: [sigmoid]\n  beta: 0.3\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: key 'beta' appears twice .*first at line 2"):
        load_config(p)
    # The same field in two sections is no duplicate, and an anchor's merge key may be overridden.
    p.write_text("data:\n  max_length: 2048\nonline:\n  max_new_tokens: 2048\n")
    assert load_config(p).online.max_new_tokens == 2048
    p.write_text("train: &t\n  seed: 3\ndpo:\n  beta: 0.2\n")
    assert load_config(p).train.seed == 3


def test_the_loss_spec_is_one_hashable_value_built_from_the_dpo_section():
    """`DPOSection.loss_spec()` is what the jitted step closes over (a static argument: hashable, equal
    settings give equal specs) and what every eval pass reads."""
    from dataclasses import replace as dataclasses_replace

    from jdpo.losses.spec import LossSpec

    over = ["--dpo.loss_type", "sigmoid,sft", "--dpo.loss_weights", "1,0.5", "--dpo.wpo", "true",
            "--dpo.beta_schedule", "adaptive", "--dpo.target_kl", "0.5"]  # fmt: skip
    spec = load_config(None, over).dpo.loss_spec()
    again = load_config(None, over).dpo.loss_spec()
    assert spec == again and hash(spec) == hash(again)
    assert spec.loss_weights == (1.0, 0.5) and spec.adaptive_beta == (0.5, 0.1) and spec.wpo
    assert Config().dpo.loss_spec() == LossSpec() and LossSpec().adaptive_beta is None
    # The eval pass: no WPO weights; an unpaired loss on pairs is the sigmoid loss at its beta.
    assert spec.for_eval(labelled=False) == dataclasses_replace(spec, wpo=False)
    kto = load_config(None, ["--dpo.loss_type", "kto", "--dpo.beta", "0.3"]).dpo.loss_spec()
    assert kto.unpaired and kto.for_eval(labelled=True) == kto
    pairs = kto.for_eval(labelled=False)
    assert pairs.loss_type == ("sigmoid",) and not pairs.unpaired and pairs.beta == 0.3
