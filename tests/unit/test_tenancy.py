"""Tenancy: who a key is, what it may see, how names and hashes are read."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from enginedge.adapters.http.auth import KeyChecker
from enginedge.application.tenancy import Principal, Tenants, tenant_of, valid_name
from enginedge.config import ApiKey


def test_a_key_is_checked_into_its_principal() -> None:
    checker = KeyChecker(
        [
            ApiKey("key-aaaaaaaa", "team-a"),
            ApiKey("key-bbbbbbbb"),
            ApiKey("key-oooooooo", admin=True),
        ]
    )
    assert checker.check("key-aaaaaaaa") == Principal(tenant_of("key-aaaaaaaa"), "team-a")
    unnamed = checker.check("key-bbbbbbbb")
    assert unnamed == Principal(tenant_of("key-bbbbbbbb"))
    assert unnamed.label == unnamed.tenant and len(unnamed.tenant) == 16
    assert checker.check("key-oooooooo").admin
    for wrong in (None, "", "key-aaaaaaa", "key-aaaaaaaab"):
        with pytest.raises(HTTPException) as caught:
            checker.check(wrong)
        assert caught.value.status_code == 401
    assert checker.tenants.label(tenant_of("key-aaaaaaaa")) == "team-a"


def test_a_tenant_sees_its_own_requests_and_an_operator_every_tenants() -> None:
    tenant = Principal("aaaaaaaaaaaaaaaa", "team-a")
    operator = Principal("bbbbbbbbbbbbbbbb", "ops", admin=True)
    assert tenant.sees("aaaaaaaaaaaaaaaa")
    assert not tenant.sees("cccccccccccccccc")
    assert not tenant.sees(None)
    assert operator.sees("cccccccccccccccc") and operator.sees(None)
    assert (tenant.scope, operator.scope) == ("aaaaaaaaaaaaaaaa", None)
    assert (tenant.label, operator.label) == ("team-a", "ops")


def test_tenants_are_named_and_resolved_by_name_or_hash() -> None:
    tenants = Tenants({"aaaaaaaaaaaaaaaa": "team-a"})
    assert tenants.label("aaaaaaaaaaaaaaaa") == "team-a"
    assert tenants.label("cccccccccccccccc") == "cccccccccccccccc"
    assert tenants.label(None) is None
    assert tenants.resolve("team-a") == "aaaaaaaaaaaaaaaa"
    assert tenants.resolve("aaaaaaaaaaaaaaaa") == "aaaaaaaaaaaaaaaa"
    # A hash no configured key has: a key since removed still owns its requests.
    assert tenants.resolve("CCCCCCCCCCCCCCCC") == "cccccccccccccccc"
    assert tenants.resolve("team-b") is None


def test_names() -> None:
    assert valid_name("search-team") and valid_name("a") and valid_name("a.b_c-9")
    for bad in ("", "-x", "Team", "a b", "x" * 64, "0123456789abcdef"):
        assert not valid_name(bad), bad
