"""The aiosmtpd seam: the import-time check refuses an aiosmtpd it does not know."""

from __future__ import annotations

import subprocess
import sys
import types

import aiosmtpd
import aiosmtpd.smtp
import pytest

from relay.smtp import aiosmtpd_compat
from relay.smtp.aiosmtpd_compat import IncompatibleAiosmtpd, check


def fake_module(
    drop: str | None = None, unset: str | None = None, gate: frozenset[str] | None = None
) -> types.ModuleType:
    """A stand-in for aiosmtpd.smtp whose SMTP lacks one method or one attribute, or
    whose STARTTLS gate lets other commands through."""
    named = (*aiosmtpd_compat.ATTRIBUTES, *aiosmtpd_compat.STARTTLS_NAMES)
    members = {
        name: getattr(aiosmtpd.smtp.SMTP, name)
        for name in (*aiosmtpd_compat.METHODS, *(s for _, s in named))
        if name != drop
    }
    if unset is not None:
        # The method no longer assigns or reads `unset`, and still does the others.
        setter = dict(named)[unset]
        others = [n for n, method in named if method == setter and n != unset]
        source = "def method(self):\n" + "".join(f"    self.{n} = None\n" for n in others)
        scope: dict[str, object] = {}
        exec(source + "    return None\n", scope)  # a fixed stand-in, built from names
        members[setter] = scope["method"]
    module = types.ModuleType("aiosmtpd.smtp")
    module.SMTP = type("SMTP", (), members)  # type: ignore[attr-defined]
    module.ALLOWED_BEFORE_STARTTLS = (  # type: ignore[attr-defined]
        aiosmtpd.smtp.ALLOWED_BEFORE_STARTTLS if gate is None else gate
    )
    return module


def test_the_installed_aiosmtpd_passes():
    check(aiosmtpd.smtp, aiosmtpd.__version__)
    check(fake_module(), aiosmtpd_compat.TESTED_VERSIONS[0])


def test_an_untested_version_is_refused_in_one_line():
    with pytest.raises(IncompatibleAiosmtpd) as info:
        check(aiosmtpd.smtp, "1.4.7")
    assert str(info.value) == (
        "aiosmtpd 1.4.7 is installed; the relay is tested with 1.4.6"
        " (pip install 'aiosmtpd==1.4.6')"
    )


@pytest.mark.parametrize("name", aiosmtpd_compat.METHODS)
def test_a_missing_method_is_named(name):
    with pytest.raises(IncompatibleAiosmtpd) as info:
        check(fake_module(drop=name), "1.4.6")
    assert str(info.value) == f"aiosmtpd 1.4.6: SMTP.{name} is missing"


@pytest.mark.parametrize(("name", "setter"), aiosmtpd_compat.ATTRIBUTES)
def test_an_attribute_no_longer_set_is_named(name, setter):
    with pytest.raises(IncompatibleAiosmtpd) as info:
        check(fake_module(unset=name), "1.4.6")
    assert str(info.value) == f"aiosmtpd 1.4.6: SMTP.{setter} no longer sets {name}"


@pytest.mark.parametrize(("name", "method"), aiosmtpd_compat.STARTTLS_NAMES)
def test_a_name_the_starttls_port_uses_is_checked(name, method):
    with pytest.raises(IncompatibleAiosmtpd) as info:
        check(fake_module(unset=name), "1.4.6")
    assert str(info.value) == f"aiosmtpd 1.4.6: SMTP.{method} no longer uses {name}"


def test_a_starttls_gate_that_lets_more_through_is_refused():
    with pytest.raises(IncompatibleAiosmtpd) as info:
        check(fake_module(gate=frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT", "RSET"})), "1.4.6")
    assert str(info.value) == "aiosmtpd 1.4.6: ALLOWED_BEFORE_STARTTLS changed"


def test_relay_serve_refuses_to_start_with_one_line(tmp_path):
    # The check runs when the server is imported; pretend a newer aiosmtpd.
    script = (
        "import sys, aiosmtpd; aiosmtpd.__version__ = '1.4.7'\n"
        "from relay.cli import main\n"
        "sys.exit(main(['serve']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(aiosmtpd_compat.__file__).rsplit("/relay/", 1)[0],
        },
    )
    assert done.returncode == 2
    assert done.stderr == (
        "relay: aiosmtpd 1.4.7 is installed; the relay is tested with 1.4.6"
        " (pip install 'aiosmtpd==1.4.6')\n"
    )
