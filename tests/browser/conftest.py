"""The console's browser fixtures (tests/browser/console_fixtures.py) for every test module here: `browser`
(headless Debian Chromium), `loop_thread` and `console` (the IdP and a control plane with the console on)."""

from tests.browser.console_fixtures import browser, console, loop_thread

__all__ = ["browser", "console", "loop_thread"]
