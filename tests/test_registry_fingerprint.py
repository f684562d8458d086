"""Fingerprints: Runtime fields never change them, identity fields always do; explain_diff."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moonforge.model.config import VLMConfig
from moonforge.registry.fingerprint import (
    code_version,
    explain_diff,
    fingerprint,
    fingerprint_inputs,
    identity,
)
from moonforge.stages.config import Frozen, Runtime, StageConfig
from moonforge.stages.stage_configs import LMPretrainConfig

MODEL = VLMConfig()
BASE = dict(
    kind="lm_pretrain",
    upstream=None,
    data=["text"],
    trainable=["lm"],
    optimizer={"lr": 1e-3},
    seq_len=16,
    batch_size=4,
    num_steps=10,
)


def fp(cfg, upstream=None, data=None, code="c0", model=MODEL):
    return fingerprint(fingerprint_inputs(cfg, model, upstream, data or {"text": "aa.dir"}, code))


def make(**over):
    return LMPretrainConfig.model_validate({**BASE, **over})


@settings(max_examples=40, deadline=None)
@given(
    log_every=st.integers(1, 10_000),
    num_workers=st.integers(0, 64),
    checkpoint_every=st.none() | st.integers(1, 10_000),
)
def test_runtime_fields_never_change_the_fingerprint(log_every, num_workers, checkpoint_every):
    cfg = make(log_every=log_every, num_workers=num_workers, checkpoint_every=checkpoint_every)
    assert fp(cfg) == fp(make())


IDENTITY = {
    "seed": st.integers(1, 10_000),
    "num_steps": st.integers(11, 10_000),
    "seq_len": st.integers(17, 4096),
    "optimizer": st.floats(1e-6, 0.5, exclude_min=False)
    .filter(lambda x: x != 1e-3)
    .map(lambda lr: {"lr": lr}),
    "router_bias_update": st.floats(0.0, 1.0).filter(lambda x: x != 1e-3),
    "trainable": st.sampled_from([["vision"], ["lm", "projector"], ["caption", "lm"]]),
    "eval": st.integers(1, 127).map(lambda n: {"num_examples": n}),
}


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(sorted(IDENTITY)), data=st.data())
def test_identity_fields_always_change_the_fingerprint(field, data):
    value = data.draw(IDENTITY[field])
    changed = make(**{field: value})
    assert fp(changed) != fp(make())
    reasons = explain_diff(
        fingerprint_inputs(make(), MODEL, None, {}, "c"), fingerprint_inputs(changed, MODEL, None, {}, "c")
    )
    assert reasons and all(r.startswith(f"config.{field}") for r in reasons), reasons


def test_nested_runtime_fields_are_walked():
    class Inner(Frozen):
        size: int = 1
        workers: Runtime[int] = 2

    class Outer(StageConfig):
        kind: str = "x"
        inner: Inner = Inner()
        inners: tuple[Inner, ...] = (Inner(),)

    base = dict(upstream=None, trainable=["lm"], optimizer={"lr": 1e-3}, seq_len=8, batch_size=2, num_steps=1)
    a = Outer.model_validate(base)
    b = Outer.model_validate({**base, "inner": {"workers": 9}, "inners": [{"workers": 7}], "num_workers": 3})
    c = Outer.model_validate({**base, "inners": [{"size": 5}]})
    assert "workers" not in identity(a)["inner"] and "num_workers" not in identity(a)
    assert fp(a) == fp(b) != fp(c)


def test_every_other_input_counts():
    cfg = make()
    ref = fp(cfg)
    assert fp(cfg, upstream=("lm_pretrain", "f" * 64)) != ref
    assert fp(cfg, data={"text": "bb.dir"}) != ref
    assert fp(cfg, code="c1") != ref
    assert fp(cfg, model=VLMConfig.model_validate({"lm": {"rope_theta": 1e5}})) != ref
    assert fp(make(name="other")) != ref


def test_explain_diff_names_upstream_data_code_and_model():
    a = fingerprint_inputs(make(), MODEL, ("up", "a" * 64), {"text": "11111111.dir"}, "c0")
    b = fingerprint_inputs(
        make(),
        VLMConfig.model_validate({"lm": {"rope_theta": 1e5}}),
        ("up", "b" * 64),
        {"text": "22222222.dir"},
        "c1",
    )
    reasons = explain_diff(a, b)
    assert any(r.startswith("model.lm.rope_theta") for r in reasons)
    assert "upstream up changed (fingerprint aaaaaaaa -> bbbbbbbb)" in reasons
    assert "data text: 11111111 -> 22222222" in reasons
    assert any(r.startswith("code version changed") for r in reasons)
    assert explain_diff(a, a) == []


def test_code_version_is_stable_within_a_process():
    assert code_version("sft") == code_version("sft") and len(code_version("sft").digest) == 16
