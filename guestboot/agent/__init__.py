"""The guest agent (C, static, /sbin/pclite-agent in the initramfs), its builder and its wire-protocol codec."""

from guestboot.agent.build import build_agent

__all__ = ["build_agent"]
