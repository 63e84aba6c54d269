"""How far the live gateways are with a deployment's revision (``lmaas deploy --wait``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from lmaas.lifecycle.deployments import fleet_status
from lmaas.registry.deployments_db import FLEET_GATEWAY_ROW, FleetRow

NOW = datetime.now(UTC)


def _row(gateway: str, name: str, **report: Any) -> FleetRow:
    return FleetRow(gateway, name, report, NOW)


def _served(revision: int, **versions: tuple[int, int]) -> dict[str, Any]:
    return {
        "revision": revision,
        "versions": {v: {"ready": r, "replicas": w} for v, (r, w) in versions.items()},
        "failed_revision": None,
        "error": None,
    }


def test_done_when_every_gateway_serving_the_name_routes_the_revision_ready() -> None:
    rows = [
        _row("a", FLEET_GATEWAY_ROW, follows=None),
        _row("a", "m", **_served(5, **{"1": (2, 2), "2": (1, 1)})),
        _row("b", FLEET_GATEWAY_ROW, follows=["m"]),
        _row("b", "m", **_served(4, **{"1": (2, 2)})),  # not there yet
        _row("c", FLEET_GATEWAY_ROW, follows=["other"]),  # does not serve m
    ]
    status = fleet_status("m", 5, False, rows)
    assert [g.gateway for g in status.gateways] == ["a", "b"]
    assert [g.done for g in status.gateways] == [True, False] and not status.done
    assert status.gateways[1].describe() == "b: revision 4 (1 2/2 ready), applying"
    rows[3] = _row("b", "m", **_served(6, **{"1": (1, 2)}))  # a later revision, loading
    assert not fleet_status("m", 5, False, rows).done
    rows[3] = _row("b", "m", **_served(6, **{"1": (2, 2)}))
    assert fleet_status("m", 5, False, rows).done
    # A gateway that has not polled yet (no row for m): not done.
    assert not fleet_status("m", 5, False, [*rows[:2], rows[2]]).done
    assert fleet_status("m", 5, False, [rows[4]]).gateways == ()  # nobody serves m: done
    assert fleet_status("m", 5, False, [rows[4]]).done


def test_a_load_failure_of_the_revision_is_an_error_and_a_stop_is_done_when_gone() -> None:
    failed = {**_served(0), "failed_revision": 3, "error": "version 1 did not become ready"}
    rows = [_row("a", FLEET_GATEWAY_ROW, follows=None), _row("a", "m", **failed)]
    status = fleet_status("m", 3, False, rows)
    assert status.errors == ["a: version 1 did not become ready"] and not status.done
    assert fleet_status("m", 4, False, rows).errors == []  # an older revision's failure
    assert fleet_status("m", 4, True, rows).done  # stopped: not served any more
    served = [rows[0], _row("a", "m", **_served(3, **{"1": (1, 1)}))]
    assert not fleet_status("m", 4, True, served).done
    assert fleet_status("m", 4, True, served[:1]).to_dict() == {
        "revision": 4,
        "stopped": True,
        "done": True,
        "gateways": [
            {
                "gateway": "a",
                "revision": 0,
                "versions": {},
                "error": None,
                "done": True,
                "retry": None,
            }
        ],
    }
