"""The control plane's web console at /ui: OIDC login (code + PKCE), server-side sessions, CSRF, pages.

This module holds only what the CLI needs before the console extra is known to be installed (the settings);
app.py builds the aiohttp application (Jinja2), auth.py the login and sessions, one module per page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROLES_CLAIM = "roles"
DEFAULT_ADMIN_ROLE = "authz-admin"
DEFAULT_VIEWER_ROLE = "authz-viewer"
# Import names of the console extra (pyproject [console]): the CLI says which extra to install when one is missing.
CONSOLE_MODULES = ("jinja2", "matplotlib")


@dataclass(frozen=True)
class ConsoleConfig:
    """How the console finds its identity provider and whom it lets in (the --console-* flags)."""

    issuer: str
    client_id: str
    client_secret: str | None = None  # None: a public client, PKCE alone binds the code to this login
    url: str | None = None  # external base URL (redirect_uri = url + /ui/callback); None: from the admin address
    roles_claim: str = DEFAULT_ROLES_CLAIM
    admin_role: str = DEFAULT_ADMIN_ROLE
    viewer_role: str = DEFAULT_VIEWER_ROLE
    ca_file: Path | None = None  # a private CA for an https issuer (else the system's)
