"""The dashboard's session rules (`fleet.dashboard.session`, `fleet.dashboard.views._next`) on
aiohttp's own request objects: where a sign-in may lead, which origins may post a form, and when
the API takes the session cookie."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from fleet.dashboard.session import COOKIE, HEADER, api_bearer, same_origin
from fleet.dashboard.views import _next


@pytest.mark.parametrize(
    ("asked", "goes"),
    [
        ("/rollouts/r-1", "/rollouts/r-1"),
        ("/devices?label=site=b12", "/devices?label=site=b12"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
        (None, "/"),
    ],
)
def test_a_sign_in_leads_only_to_a_path_here(asked: str | None, goes: str) -> None:
    assert _next(asked) == goes


def test_forms_are_taken_from_this_origin_only() -> None:
    def post(**headers: str) -> bool:
        return same_origin(
            make_mocked_request("POST", "/login", headers={"Host": "c:8470", **headers})
        )

    assert post()  # the browser did not say: nothing to compare
    assert post(Origin="http://c:8470")
    assert not post(Origin="http://evil.example")
    assert not post(Origin="null")


def test_the_api_takes_the_cookie_only_with_the_dashboard_header() -> None:
    cookie = {"Cookie": f"{COOKIE}=fleet_secret"}
    assert api_bearer(make_mocked_request("POST", "/api/v1/x", headers=cookie)) is None
    with_header = make_mocked_request("POST", "/api/v1/x", headers={**cookie, HEADER: "1"})
    assert api_bearer(with_header) == "fleet_secret"
    bearer = make_mocked_request("GET", "/api/v1/x", headers={"Authorization": "Bearer fleet_t"})
    assert api_bearer(bearer) == "fleet_t"
