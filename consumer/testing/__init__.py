"""Test doubles for users' tests, as `structlog.testing`: `VercelSimulator`, a local stand-in
for Vercel's Create Event endpoint. The relay never imports this package."""

from consumer.testing.vercel_sim import Accepted, Fault, Refused, VercelSimulator

__all__ = ["Accepted", "Fault", "Refused", "VercelSimulator"]
