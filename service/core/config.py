"""pclited settings: defaults < config file (YAML) < environment (PCLITE_*) < explicit overrides."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

SYSTEM_CONFIG = Path("/etc/pclite/pclited.yaml")
# sun_path is 108 bytes; the run dir must leave room for "/vm-xxxxxxxxxxxx.sock".
MAX_RUN_DIR_LEN = 85


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/pclite")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "pclite"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PCLITE_", extra="forbid", validate_default=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = None  # default: sqlite under data_dir
    run_dir: Path | None = None  # VMM control sockets; default data_dir/run
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0 = any free port (printed on start)
    unix_socket: Path | None = None
    token: str | None = None  # None: generated once into data_dir/token
    write_client_config: bool = True  # for pclitectl, when the file is missing
    client_config: Path = Field(default_factory=lambda: Path.home() / ".config/pclite/config")
    log_level: str = "info"
    access_log: bool = False

    # Quotas over VMs that hold resources (booting, ready, claimed, stopping).
    max_vms: int = Field(64, ge=0)
    max_guest_mem_mib: int = Field(16384, ge=0)

    # Pools and supervision.
    boot_concurrency: int = Field(2, ge=1, le=64)  # background refills in flight, all flavors
    boot_timeout_s: float = Field(60.0, gt=0)
    stop_timeout_s: float = Field(5.0, gt=0)
    pool_tick_s: float = Field(1.0, gt=0)
    supervise_interval_s: float = Field(0.25, gt=0)
    health_interval_s: float = Field(10.0, gt=0)
    health_failures: int = Field(2, ge=1)  # consecutive failed pings before a ready VM is failed
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    degrade_after_failures: int = Field(2, ge=1)
    # Clone templates: a failed build or restore is retried after this, doubling per failure up to the max.
    template_backoff_s: float = Field(5.0, gt=0)
    template_backoff_max_s: float = Field(600.0, gt=0)
    terminal_retention_s: float = Field(86400.0, ge=0)  # stopped/failed VM rows and their logs
    vmm_detach: bool = True  # VMMs outlive a pclited restart and are adopted; False: they die with it
    # Fork VMMs from a pre-imported server: no interpreter start per VM (~1 s of a lab boot). False: a fresh
    # `python -m hypervisor` per VM.
    vmm_forkserver: bool = True
    # Pool refills boot at this nice value (0: as pclited) and get the normal priority back when claimed: a refill
    # is background work and must not slow the claimed VMs' containers down on a host short of CPUs.
    refill_nice: int = Field(10, ge=0, le=19)
    # A jail per VMM (service/services/jail.py): opt-in (true) until jailed guests pass in the lab (None = on when
    # pclited runs as root); what is off is logged and exported (pclite_jail_enabled, /readyz). Uids/gids come from
    # base .. base+count-1, one per live VM.
    jail: bool | None = False
    jail_uid_base: int = Field(200000, ge=1000)
    jail_uid_count: int = Field(4096, ge=1)
    jail_cgroup: Path = Path("/sys/fs/cgroup/pclite")  # under cgroup v2, with memory, pids and cpu delegated
    jail_vmm_overhead_mib: int = Field(256, ge=32)  # memory.max = guest RAM + this (interpreter, threads, buffers)

    # Container rootfs. By path (POST /v1/vms/{id}/rootfs {"path": ...}) only beneath these directories, resolved
    # so that `..` and symlinks stay inside; empty: the path form is refused and clients send a tar stream.
    rootfs_path_roots: list[Path] = Field(default_factory=list)
    # The most one VM's rootfs image may take on the host's disk (a tar's declared member sizes count before
    # anything is written; an explicit size_mib counts too).
    rootfs_max_bytes: int = Field(4 << 30, ge=1 << 20)

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().absolute()
        if self.run_dir is None:
            self.run_dir = self.data_dir / "run"
        self.run_dir = self.run_dir.expanduser().absolute()
        if len(str(self.run_dir)) > MAX_RUN_DIR_LEN:
            raise ValueError(f"run_dir {self.run_dir} is too long for Unix sockets (max {MAX_RUN_DIR_LEN} chars): "
                             "set PCLITE_RUN_DIR to a shorter directory")
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'pclite.db'}"
        if self.backoff_max_s < self.backoff_base_s:
            self.backoff_max_s = self.backoff_base_s
        self.template_backoff_max_s = max(self.template_backoff_max_s, self.template_backoff_s)
        for root in self.rootfs_path_roots:
            if not root.is_absolute():
                raise ValueError(f"rootfs_path_roots entry {root} is not an absolute path: list absolute directories")
        return self

    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    @property
    def vm_dir(self) -> Path:
        return self.data_dir / "vms"

    @property
    def templates_dir(self) -> Path:
        """Clone flavors' template snapshots: <flavor>-<spec hash>/{state.json,memory}."""
        return self.data_dir / "templates"


def load_settings(config_file: str | Path | None = None, **overrides) -> Settings:
    """config_file, else $PCLITE_CONFIG_FILE, else /etc/pclite/pclited.yaml when it exists."""
    explicit = config_file or os.environ.get("PCLITE_CONFIG_FILE")
    path = Path(explicit) if explicit else (SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None)
    if explicit and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")

    class PclitedSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            sources = (init_settings, env_settings)
            return (*sources, YamlConfigSettingsSource(settings_cls, yaml_file=path)) if path else sources

    return PclitedSettings(**overrides)
