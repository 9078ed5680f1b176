"""The dashboard: its pages and assets (shipped in ``martinet_app/static``) and the login form."""

from __future__ import annotations

from .access import Access
from .web import Route


def routes(access: Access) -> list[Route]:
    """The dashboard's routes."""
    return []
