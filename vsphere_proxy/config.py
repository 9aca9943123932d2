"""The configuration file: one YAML document validated by pydantic (DESIGN §8).

Credentials are never in the file itself nor on the command line: they come from environment variables
or from a separate credentials file. A bad value becomes one `ConfigError` line naming the field and value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vsphere_proxy.coordinator import DiskStreams, Policy
from vsphere_proxy.model import Tag
from vsphere_proxy.notify import NotifyConfig
from vsphere_proxy.retention import Duration, Rules
from vsphere_proxy.scheduler import StreamFormula

LUN_NAME = re.compile(r"^(naa|eui|t10)\.[0-9A-Za-z_.-]+$")
NFS_EXPORT = re.compile(r"^[A-Za-z0-9_.:\[\]-]+:/\S*$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line for the user."""


def _matching(pattern: re.Pattern[str], must: str) -> AfterValidator:
    def check(v: str) -> str:
        if not pattern.match(v):
            raise ValueError(must)
        return v

    return AfterValidator(check)


Name = Annotated[str, _matching(NAME, "must be 1-80 letters, digits, '.', '_' or '-'")]
LunName = Annotated[str, _matching(LUN_NAME, "must be a LUN canonical name (naa.*, eui.* or t10.*)")]
NfsExport = Annotated[str, _matching(NFS_EXPORT, "must be an NFS export of the form host:/path")]


def _absolute_dir(v: Path) -> Path:
    if not v.is_absolute():
        raise ValueError(f"must be an absolute directory (got {str(v)!r})")
    return v


AbsoluteDir = Annotated[Path, AfterValidator(_absolute_dir)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


class Credentials(_Strict):
    """Where the vCenter username and password come from: environment variables, or a file."""

    username_env: str = "VSPHERE_USERNAME"
    password_env: str = "VSPHERE_PASSWORD"
    file: Path | None = None  # YAML with `username:` and `password:`, readable by its owner only

    def resolve(self, env: Mapping[str, str] | None = None) -> tuple[str, SecretStr]:
        """Read the username and password; raise ConfigError naming what is missing (never the value)."""
        env = os.environ if env is None else env
        if self.file is not None:
            return _read_credentials_file(self.file)
        user, password = env.get(self.username_env, ""), env.get(self.password_env, "")
        if not user:
            raise ConfigError(f"vcenter.credentials.username_env: environment variable {self.username_env} is not set")
        if not password:
            raise ConfigError(f"vcenter.credentials.password_env: environment variable {self.password_env} is not set")
        return user, SecretStr(password)


def _read_credentials_file(path: Path) -> tuple[str, SecretStr]:
    where = f"vcenter.credentials.file: {path}"
    try:
        mode = path.stat().st_mode
        data = _load_yaml(path.read_text())
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{where}: not valid YAML: {e.problem}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where}: not valid YAML") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{where}: readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
    if not isinstance(data, dict) or not data.get("username") or not data.get("password"):
        raise ConfigError(f"{where}: needs non-empty 'username' and 'password' keys")
    return str(data["username"]), SecretStr(str(data["password"]))


class VCenterConfig(_Strict):
    url: str
    insecure: bool = False  # skip TLS verification; required for plain http (the simulator)
    ca_file: Path | None = None
    credentials: Credentials = Credentials()
    connect_retries: Annotated[int, Field(ge=1, le=10, description=(
        "attempts at reaching vCenter to log in (a refused or reset connection, a timeout), with back-off"))] = 3
    timeout: Annotated[float, Field(gt=0, le=600, description=(
        "seconds every vCenter call (SOAP, datastore HTTP, Automation API) may take to connect, and again for "
        "each read of its answer"))] = 60.0
    retries: Annotated[int, Field(ge=1, le=10, description=(
        "attempts of a vCenter call that timed out or lost its connection (a change vCenter may have begun is "
        "not sent again); a vCenter that stops answering ends the job after about timeout x retries"))] = 4

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an https:// (or, for a simulator, http://) URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials; use vcenter.credentials")
        if parts.path in ("", "/"):
            v = v.rstrip("/") + "/sdk"
        return v

    @model_validator(mode="after")
    def _http_needs_insecure(self) -> VCenterConfig:
        if self.url.startswith("http://") and not self.insecure:
            raise ValueError("url: plain http carries no TLS; write `insecure: true` to allow it")
        return self


class ProxyConfig(_Strict):
    name: Name
    kind: Literal["vm", "physical"]
    cpus: Annotated[int, Field(ge=1, le=4096)] | None = None  # physical only: VM proxies read theirs from vCenter
    ram_mb: Annotated[int, Field(ge=1, le=1 << 24)] | None = None
    luns: list[LunName] = []  # physical only: LUNs its agent reports as visible
    nfs_exports: list[NfsExport] = []  # host:/path exports it can mount (direct NFS)
    vsda_active: bool = True
    nbd: bool = True
    # san / direct NFS: where this proxy mounts each datastore it reads itself (datastore name -> directory)
    paths: dict[str, Path] = {}
    # hot-add: how the proxy VM's guest names an attached disk: /dev/disk/by-id/wwn-0x<disk uuid> (needs
    # disk.EnableUUID), or, for the simulator, which has no guest, the disk's flat file under `paths`
    hotadd_devices: Literal["disk-uuid", "simulated"] = "disk-uuid"
    # throttling: each stream of this proxy reads at most this many MB/s (null: as fast as it can)
    stream_mb_s: Annotated[float, Field(gt=0, le=1e6)] | None = None

    @model_validator(mode="after")
    def _by_kind(self) -> ProxyConfig:
        if self.kind == "physical" and (self.cpus is None or self.ram_mb is None):
            raise ValueError("a physical proxy needs cpus and ram_mb")
        if self.kind == "vm" and self.luns:
            raise ValueError("luns: a VM proxy's LUNs come from vCenter (RDM disks or passthrough HBAs)")
        for datastore, path in self.paths.items():
            if not path.is_absolute():
                raise ValueError(f"paths: {datastore}: must be an absolute directory (got {str(path)!r})")
        if self.hotadd_devices == "simulated" and self.kind != "vm":
            raise ValueError("hotadd_devices: only a VM proxy hot-adds disks")
        return self


class Selection(_Strict):
    """Which VMs a job backs up: every VM matching any criterion, minus the exclusions."""

    names: list[str] = []  # glob patterns on VM names
    folders: list[str] = []  # "/" is every VM; "Production" includes its subfolders
    clusters: list[str] = []
    datastores: list[str] = []
    tags: list[str] = []  # Category:Tag
    exclude: list[str] = []  # glob patterns on VM names

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for t in v:
            Tag.parse(t)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> Selection:
        if not (self.names or self.folders or self.clusters or self.datastores or self.tags):
            raise ValueError("select at least one of names, folders, clusters, datastores, tags")
        return self


class RetentionConfig(_Strict):
    """Which restore points of each VM to keep (restic's rules, `vsphere_proxy.retention`): counts are >= 1 or -1
    (every period); `keep_within` a duration (`30d`, `1y6m`, `36h`). Periods are calendar periods in `timezone`
    (an IANA name; `local`: this host's zone). Held points are always kept."""

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: str | None = None
    timezone: str = "local"
    after_backup: bool = False  # `backup`: forget what the rules remove once a job completes
    prune: bool = True  # with after_backup: prune too, when no other job holds the repository

    @model_validator(mode="after")
    def _valid(self) -> RetentionConfig:
        rules = self.rules()  # ValueError naming the field
        if rules.empty():
            raise ValueError("set at least one keep_* rule (an empty policy would remove every point)")
        self.tz()
        return self

    def rules(self) -> Rules:
        within = None
        if self.keep_within is not None:
            try:
                within = Duration.parse(self.keep_within)
            except ValueError as e:
                raise ValueError(f"keep_within: {e}") from None
        return Rules(keep_last=self.keep_last, keep_hourly=self.keep_hourly, keep_daily=self.keep_daily,
                     keep_weekly=self.keep_weekly, keep_monthly=self.keep_monthly, keep_yearly=self.keep_yearly,
                     keep_within=within)

    def tz(self) -> tzinfo:
        return zone(self.timezone, "timezone")


def zone(name: str, field: str = "timezone") -> tzinfo:
    """The time zone `name` (an IANA name, or `local` for this host's); ValueError naming `field`."""
    if name == "local":
        local = datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{field}: unknown time zone {name!r} (an IANA name such as Europe/Berlin, or local)") \
            from None


class PolicyConfig(_Strict):
    """The job's storage policy (DESIGN §4): stream limits, datastore threshold, disk streams, rounds."""

    max_streams: Annotated[int, Field(ge=1, le=100_000)] | None = None  # default 2 x distinct datastores
    threshold: Annotated[int, Field(ge=1, le=1000)] = 1
    datastore_cap: Annotated[int, Field(ge=1, le=1000)] = 4
    disk_streams: Literal["auto", "off"] = "auto"
    rounds: Annotated[int, Field(ge=1, le=10)] = 3
    streams_per_cpu: Annotated[int, Field(ge=1, le=1000)] = 10
    mb_per_stream: Annotated[int, Field(ge=1, le=1 << 20)] = 100
    # quiesce the guest file systems (VMware Tools) when snapshotting powered-on VMs: required (a quiesce fault,
    # after quiesce_retries more tries, fails the VM), preferred (then a crash-consistent snapshot, noted), off;
    # the booleans of old configurations mean required (true) and off (false)
    quiesce: Literal["required", "preferred", "off"] = "off"
    quiesce_retries: Annotated[int, Field(ge=0, le=10)] = 1
    # the VM's disks need consolidation after our snapshot was removed: consolidate them (auto) or only say so
    consolidate: Literal["auto", "report"] = "auto"
    incremental: bool = True  # read only the blocks CBT reports changed since the VM's last restore point
    # a VM whose disk would be read in full although it has a restore point to build on (changeId refused, CBT
    # reset or off) fails instead of reading it all
    require_incremental: bool = False
    stall_seconds: Annotated[float, Field(gt=0, le=86_400)] = 300.0  # a stream without progress this long fails
    # A VM another running job is backing up: skip it (reported "being backed up by job X"), or wait for it
    # at most busy_wait_seconds and skip it then.
    on_busy: Literal["skip", "wait"] = "skip"
    busy_wait_seconds: Annotated[float, Field(ge=0, le=86_400)] = 1800.0
    # The job's liveness lease in the catalog, renewed every third of it: a job that stopped renewing it is
    # dead, and only then may another job's sweep remove its snapshots and hot-added disks.
    lease_seconds: Annotated[float, Field(ge=3, le=3600)] = 60.0
    retention: RetentionConfig | None = None  # `forget` and `backup` (after_backup) apply it
    # independent disks are not captured by snapshots: leave them out (reported), or fail the VM that has one
    independent_disks: Literal["skip", "fail"] = "skip"
    # disks never read: VM name pattern -> disk labels ("Hard disk 3") or indexes (0 = the VM's first disk)
    exclude_disks: dict[str, list[str | int]] = {}

    @field_validator("quiesce", mode="before")
    @classmethod
    def _quiesce_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "required" if value else "off"
        return value

    @model_validator(mode="after")
    def _cap(self) -> PolicyConfig:
        if self.datastore_cap < self.threshold:
            raise ValueError(f"datastore_cap: must be >= threshold {self.threshold} (got {self.datastore_cap})")
        return self

    def to_policy(self) -> Policy:
        return Policy(self.max_streams, self.threshold, self.datastore_cap, DiskStreams(self.disk_streams),
                      self.rounds, StreamFormula(self.streams_per_cpu, self.mb_per_stream))


class JobConfig(_Strict):
    name: Name = "backup"
    select: Selection
    proxies: list[str] | None = None  # the proxies this job may use; default all
    policy: PolicyConfig = PolicyConfig()


class EncryptionConfig(_Strict):
    """Where an encrypted repository's key comes from: exactly one of a passphrase in an environment variable, a
    passphrase file, or a key file (each readable by its owner only). Never the secret itself."""

    passphrase_env: str | None = None
    passphrase_file: Path | None = None
    key_file: Path | None = None  # created (mode 0600) by the `init` that creates the repository
    label: Annotated[str, Field(max_length=200)] = ""  # of the key slot `init` creates
    # argon2id's costs for passphrase slots this host creates (RFC 9106: 64 MiB, 3 passes, 4 lanes)
    kdf_memory_mib: Annotated[int, Field(ge=8, le=4096)] = 64
    kdf_time_cost: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _one_source(self) -> EncryptionConfig:
        given = [n for n in ("passphrase_env", "passphrase_file", "key_file") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of passphrase_env, passphrase_file, key_file"
                             + (f" (got {', '.join(given)})" if given else ""))
        for name in ("passphrase_file", "key_file"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                raise ValueError(f"{name}: must be an absolute file path (got {str(value)!r})")
        return self


class RepositoryConfig(_Strict):
    """Where restore points go (a local or mounted directory) and where the catalog of jobs lives."""

    path: AbsoluteDir
    encryption: EncryptionConfig | None = None  # the repository is (or is created) encrypted
    catalog: str | None = None  # SQLAlchemy URL or SQLite file; default: catalog.sqlite beside the repository
    # the embedded engine's stream ledger, shared by every job of this host naming the same file (jobs that share
    # proxies must share it); default: beside the SQLite catalog, or in the state directory (`ledger_path`)
    ledger: Path | None = None

    @field_validator("ledger")
    @classmethod
    def _absolute_file(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"must be an absolute file path (got {str(v)!r})")
        return v

    def catalog_target(self) -> str:
        return self.catalog or str(self.path.parent / f"{self.path.name}.catalog.sqlite")

    def ledger_path(self) -> Path:
        """`ledger`; else beside the SQLite catalog (`<repository>.ledger.sqlite` beside the default one,
        `ledger.sqlite` beside a named one); else, the catalog on a server, `ledger.sqlite` in `state_home()`."""
        if self.ledger is not None:
            return self.ledger
        if self.catalog is None:
            return self.path.parent / f"{self.path.name}.ledger.sqlite"
        parts = urlsplit(self.catalog) if "://" in self.catalog else None
        if parts is None:
            return Path(self.catalog).resolve().parent / "ledger.sqlite"  # a file, as the catalog resolves it
        if parts.scheme.partition("+")[0] == "sqlite" and parts.path[1:] not in ("", ":memory:"):
            return Path(parts.path[1:]).resolve().parent / "ledger.sqlite"
        return state_home() / "ledger.sqlite"


def state_home() -> Path:
    """This user's state directory for vsphere-proxy: `$XDG_STATE_HOME/vsphere-proxy`, by default
    `~/.local/state/vsphere-proxy`."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    return (Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "state") / "vsphere-proxy"


def _redis_url(v: str) -> str:
    parts = urlsplit(v)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("must be a redis:// or rediss:// URL with a host")
    if parts.password:
        raise ValueError("must not contain a password; use distributed.password_env")
    return v


RedisUrl = Annotated[str, AfterValidator(_redis_url)]


class DistributedConfig(_Strict):
    """The distributed engine (DESIGN §6): proxies as Celery workers; Redis as broker, result backend and ledger."""

    broker: RedisUrl
    backend: RedisUrl | None = None  # default: the broker
    ledger: RedisUrl | None = None  # default: the broker
    password_env: str | None = None  # the Redis password, from this environment variable
    lease_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0  # a stream's lease; a dead worker's expire
    heartbeat_seconds: Annotated[float, Field(gt=0, le=600)] | None = None  # default: a third of the lease
    idle_seconds: Annotated[float, Field(gt=0, le=86_400)] = 120.0  # a worker ends an attempt no one feeds

    @model_validator(mode="after")
    def _heartbeat(self) -> DistributedConfig:
        if self.heartbeat_seconds is not None and self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(f"heartbeat_seconds: must be shorter than lease_seconds {self.lease_seconds:g}"
                             f" (got {self.heartbeat_seconds:g})")
        return self

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3

    def url(self, which: Literal["broker", "backend", "ledger"], env: Mapping[str, str] | None = None) -> str:
        """The URL with the password from `password_env` put in (never logged, never in the file)."""
        url = getattr(self, which) or self.broker
        if self.password_env is None:
            return url
        env = os.environ if env is None else env
        password = env.get(self.password_env, "")
        if not password:
            raise ConfigError(f"distributed.password_env: environment variable {self.password_env} is not set")
        parts = urlsplit(url)
        user = parts.username or ""
        from urllib.parse import quote

        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
        if parts.port:
            netloc += f":{parts.port}"
        return parts._replace(netloc=netloc).geturl()


class DashboardConfig(_Strict):
    """`vsphere-proxy serve`: where it listens and where the token clients must send comes from (a file readable by
    its owner only, else an environment variable; never the configuration itself). Loopback needs no token."""

    listen: str = "127.0.0.1:8080"
    token_env: str = "VSPHERE_PROXY_DASHBOARD_TOKEN"
    token_file: Path | None = None

    def token(self, env: Mapping[str, str] | None = None) -> str | None:
        if self.token_file is not None:
            where = f"dashboard.token_file: {self.token_file}"
            try:
                mode = self.token_file.stat().st_mode
                text = self.token_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{where}: readable by group or others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
            if not text:
                raise ConfigError(f"{where}: empty")
            return text
        env = os.environ if env is None else env
        return env.get(self.token_env) or None


HookPolicy = Literal["fail_job", "skip_vm", "ignore"]
HOOK_EVENTS = ("before_job", "after_job", "before_vm", "after_vm", "on_failure")
# what a hook that fails does when its `on_error` is not written: a failing `before_*` stops what it precedes
DEFAULT_HOOK_POLICY: dict[str, HookPolicy] = {"before_job": "fail_job", "before_vm": "skip_vm",
                                              "after_vm": "ignore", "after_job": "ignore", "on_failure": "ignore"}


class HookConfig(_Strict):
    """One command a job runs at an event: an argv list (no shell), or a string with `shell: true` written."""

    command: Annotated[list[str], Field(min_length=1)] | str
    shell: bool = False
    timeout_seconds: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    on_error: HookPolicy | None = None  # default: DEFAULT_HOOK_POLICY of its event
    output_bytes: Annotated[int, Field(ge=0, le=1 << 20)] = 8192  # of its output kept in the job report

    @model_validator(mode="after")
    def _shape(self) -> HookConfig:
        if isinstance(self.command, str) and not self.shell:
            raise ValueError("command: a string runs through a shell only with `shell: true` written; "
                             "otherwise give an argv list")
        if isinstance(self.command, list) and self.shell:
            raise ValueError("command: with `shell: true`, give one string")
        if isinstance(self.command, str) and not self.command.strip():
            raise ValueError("command: must not be empty")
        return self


def _hook_list(v: Any) -> Any:
    return [v] if isinstance(v, dict | str) else v


HookList = Annotated[list[HookConfig], BeforeValidator(_hook_list)]


class HooksConfig(_Strict):
    """Commands the backup job runs (README, "Calling vsphere-proxy from your backup software"), each event's in
    order."""

    before_job: HookList = []
    after_job: HookList = []
    before_vm: HookList = []
    after_vm: HookList = []
    on_failure: HookList = []

    @model_validator(mode="after")
    def _policies(self) -> HooksConfig:
        for event in HOOK_EVENTS:
            for i, hook in enumerate(getattr(self, event)):
                if hook.on_error == "skip_vm" and event != "before_vm":
                    raise ValueError(f"{event}[{i}].on_error: skip_vm is for before_vm hooks only")
        return self

    def of(self, event: str) -> list[HookConfig]:
        return list(getattr(self, event))

    def policy(self, event: str, hook: HookConfig) -> HookPolicy:
        return hook.on_error or DEFAULT_HOOK_POLICY[event]

    def __bool__(self) -> bool:
        return any(getattr(self, event) for event in HOOK_EVENTS)


class CopySelect(_Strict):
    """Which restore points a copy job copies: of these VMs (default all), started within `since` of now
    (default any time), each VM's `latest` newest ones (default all)."""

    vms: list[str] | None = None
    since: str | None = None
    latest: Annotated[int, Field(ge=1, le=100_000)] | None = None

    @field_validator("since")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is not None:
            Duration.parse(v)
        return v


class CopyTargetConfig(_Strict):
    """A second repository restore points are copied to (`vsphere-proxy copy --to NAME`): the disaster-recovery
    or compliance copy, with its own key and retention."""

    name: Name
    path: AbsoluteDir
    encryption: EncryptionConfig | None = None
    retention: RetentionConfig | None = None  # applied to the target after each copy (forget and prune)
    select: CopySelect = CopySelect()


class Config(_Strict):
    vcenter: VCenterConfig
    proxies: Annotated[list[ProxyConfig], Field(min_length=1)]
    job: JobConfig
    repository: RepositoryConfig | None = None  # needed by backup, restore and verify
    distributed: DistributedConfig | None = None  # needed by `worker` and `backup --engine celery`
    dashboard: DashboardConfig = DashboardConfig()  # `serve`
    repositories: list[CopyTargetConfig] = []  # copy targets (`copy --to NAME`)
    hooks: HooksConfig = HooksConfig()  # commands `backup` runs before and after the job and each VM
    notify: NotifyConfig | None = None  # job-end notifications through apprise

    def secret_env_names(self) -> set[str]:
        """The environment variables this configuration reads secrets from (kept out of every hook's
        environment)."""
        names = {self.vcenter.credentials.password_env}
        encryptions = [self.repository.encryption if self.repository else None,
                       *(r.encryption for r in self.repositories)]
        names |= {e.passphrase_env for e in encryptions if e is not None and e.passphrase_env}
        if self.distributed is not None and self.distributed.password_env:
            names.add(self.distributed.password_env)
        if self.notify is not None:
            names |= set(self.notify.urls_env)
        return names

    @model_validator(mode="after")
    def _references(self) -> Config:
        names = [p.name for p in self.proxies]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"proxies: name {dup[0]!r} is used twice")
        for n in self.job.proxies or []:
            if n not in names:
                raise ValueError(f"job.proxies: {n!r} is not one of the configured proxies")
        targets = [r.name for r in self.repositories]
        dup = sorted({n for n in targets if targets.count(n) > 1})
        if dup:
            raise ValueError(f"repositories: name {dup[0]!r} is used twice")
        if self.repository is not None:
            for r in self.repositories:
                if r.path.resolve() == self.repository.path.resolve():
                    raise ValueError(f"repositories: {r.name!r} is the job's own repository ({r.path})")
        return self

    def job_proxies(self) -> list[ProxyConfig]:
        wanted = self.job.proxies
        return [p for p in self.proxies if wanted is None or p.name in wanted]


def _location(loc: tuple[Any, ...], data: Any) -> tuple[str, Any]:
    """Render a pydantic error location as `proxies[1].kind` and find the offending value."""
    text, value = "", data
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
    return text, value


def _masked(value: Any) -> Any:
    """A URL's password replaced by *** (an error message must not carry it)."""
    if isinstance(value, str) and "://" in value:
        try:
            parts = urlsplit(value)
            if parts.password:
                return value.replace(f":{parts.password}@", ":***@", 1)
        except ValueError:
            return value
    return value


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate `data` as `model`; the first problem becomes one line: `source: loc: message (got value)`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc, value = _location(tuple(p for p in err["loc"] if p not in ("function-after",)), data)
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if value is None or isinstance(value, dict | list) else f" (got {_masked(value)!r})"
        where = f"{loc}: " if loc else ""
        raise ConfigError(f"{source}: {where}{msg}{got}") from None


def parse_config(data: Any, source: str = "config") -> Config:
    return validate(Config, data, source)


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping key written twice; `problem` names the key and the line of its first occurrence."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error, not "the last one wins"
    (a second `repository:` would silently replace the first)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges; keys written beside it override the merged ones, as YAML says
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if first is not key_node:
                    raise _DuplicateKey(
                        None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def read_yaml_mapping(path: Path, expected: str) -> dict[str, Any]:
    """Read a YAML (or JSON) file holding one mapping; every problem is a one-line ConfigError."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with {expected}")
    return data


def load_config(path: Path) -> Config:
    """Read and validate a configuration file; every problem is a one-line ConfigError."""
    return parse_config(read_yaml_mapping(path, "vcenter, proxies and job"), str(path))
