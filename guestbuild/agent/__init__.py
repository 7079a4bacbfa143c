"""The guest agent (C, static, /sbin/pclite-agent in the initramfs) and its builder; the host side of its wire
protocol is hypervisor/agent_protocol.py."""

__all__ = ["build_agent"]


def __getattr__(name: str):
    # Lazy: the builder (subprocess, hashlib, pathlib, ...) loads on first use.
    if name == "build_agent":
        from guestbuild.agent.build import build_agent
        return build_agent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
