"""printable(): text from peers, inert in logs and on terminals."""

from __future__ import annotations

import pytest

from hatchway.mux import events as ev
from hatchway.mux.frames import OpenFailure, decode_reason
from hatchway.mux.session import Multiplexer, Role
from hatchway.relay.tunnels import _clean_props
from hatchway.text import printable


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("dev1", "dev1"),
        ("caf\u00e9 \u20ac", "caf\u00e9 \u20ac"),  # printable Unicode stays
        ("a\r\nb", "a\\r\\nb"),
        ("\x1b[2J\x1b]0;title\x07", "\\x1b[2J\\x1b]0;title\\x07"),
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
        ("left\u202eright\u2028", "left\\u202eright\\u2028"),
    ],
)
def test_unsafe_characters_are_escaped(given: str, shown: str) -> None:
    assert printable(given) == shown


def test_the_limit_applies_before_escaping() -> None:
    assert printable("x" * 300) == "x" * 256
    assert printable("\n" * 10, limit=3) == "\\n\\n\\n"


def test_a_peers_reason_text_arrives_inert() -> None:
    """The codec carries the text as sent; the multiplexer hands it on inert."""
    relay, agent = Multiplexer(Role.RELAY), Multiplexer(Role.AGENT)
    for mux in (relay, agent):
        mux.mark_established()
    channel = relay.open_channel("ssh")
    agent.receive_data(b"".join(relay.data_to_send()))
    agent.events_received()
    agent.reject_channel(channel, OpenFailure.REFUSED, "refused\nWARNING forged")
    wire = b"".join(agent.data_to_send())
    assert decode_reason(wire[9:], "OPEN_FAILED")[1] == "refused\nWARNING forged"
    relay.receive_data(wire)
    (failed,) = relay.events_received()
    assert isinstance(failed, ev.ChannelOpenFailed)
    assert failed.message == "refused\\nWARNING forged"


def test_a_devices_hello_properties_are_kept_inert() -> None:
    props = _clean_props(
        {"hostname": "gw\n1", "agent_version": "1.0\x1b[31m", "services": ["ssh\r", "http"]}
    )
    assert props == {
        "hostname": "gw\\n1",
        "agent_version": "1.0\\x1b[31m",
        "services": ["ssh\\r", "http"],
    }
