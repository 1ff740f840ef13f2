"""`GenerationSpec.model`: fingerprinted only when set, stored with the job, and checked
by each provider against its models."""

from __future__ import annotations

import pytest

from imagegen.api.convert import spec_from_proto, spec_to_proto
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import GenerationSpec
from imagegen.providers.base import ProviderRequest, check_model
from imagegen.providers.local import LocalProvider
from imagegen.repositories.generations import spec_from_json, spec_to_json


def test_the_fingerprint_has_a_model_only_when_one_is_chosen() -> None:
    plain = GenerationSpec(prompt="a fox")
    assert "model" not in plain.fingerprint(), "jobs stored before models still match"
    chosen = GenerationSpec(prompt="a fox", model="m-1")
    assert chosen.fingerprint() == {**plain.fingerprint(), "model": "m-1"}


def test_the_model_is_stored_with_the_job_and_read_back() -> None:
    spec = GenerationSpec(prompt="a fox", model="m-1")
    assert spec_from_json(spec_to_json(spec)) == spec
    legacy = spec_to_json(GenerationSpec(prompt="a fox"))
    assert "model" not in legacy
    assert spec_from_json(legacy).model == ""


def test_the_contract_field_is_read_and_written() -> None:
    from imagegen.v1 import common_pb2

    spec = spec_from_proto(common_pb2.GenerationSpec(prompt="a fox", model="m-1"))
    assert spec.model == "m-1"
    assert spec_to_proto(spec).model == "m-1"


def test_check_model_names_the_offered_models() -> None:
    check_model("p", ("a", "b"), "")
    check_model("p", ("a", "b"), "b")
    with pytest.raises(InvalidRequest) as caught:
        check_model("p", ("a", "b"), "c")
    assert caught.value.field == "model" and caught.value.code == "IMG_003"
    assert "a, b" in caught.value.message and caught.value.metadata["models"] == "a,b"


def test_the_local_provider_offers_its_own_model_only() -> None:
    provider = LocalProvider(step_delay=0)
    provider.check(ProviderRequest(prompt="a fox", model="local-pillow-1"))
    with pytest.raises(InvalidRequest):
        provider.check(ProviderRequest(prompt="a fox", model="gpt-image-1"))
