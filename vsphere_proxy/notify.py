"""Job-end notifications through apprise: email, webhooks and chat, for the job statuses the admin picks.

The configuration (`notify:` in the YAML file) names where to send; the URLs of `notify.urls` are written in the
file itself and so must carry no secret, while a URL holding a token or a password comes from an environment
variable (`urls_env`) or from a file readable by its owner only (`urls_file`). A notification never fails the job:
every delivery problem becomes one line of `NotifyOutcome.problems`, with the URLs from the environment or the file
masked to their scheme, and the whole sending is bounded by `timeout_seconds`.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vsphere_proxy.units import human_size

JobStatus = Literal["complete", "partial", "failed", "interrupted"]

BODY_LIMIT = 8 * 1024  # bytes of the body (UTF-8), at most
TITLE_LIMIT = 250  # characters of the title (apprise's common limit)
LINE_LIMIT = 400  # characters of one line of the body
LIST_LIMIT = 50  # lines of one list of the body (VMs that failed, fell back; job problems)
URLS_FILE_LIMIT = 64 * 1024  # bytes of urls_file
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,31})://")
# Query parameters whose value is a secret: one of these words in the name, or a name ending with one of the
# suffixes (`apikey`, `access_token`, `+X-Api-Key`, `client_secret`); apprise's `+`, `-` and `:` prefixes are ignored.
SECRET_WORDS = frozenset({"pass", "passwd", "password", "pwd", "token", "secret", "key", "apikey", "auth",
                          "authorization", "credential", "credentials", "sig", "signature"})
SECRET_SUFFIXES = ("key", "token", "secret", "password", "passwd")
NOTIFY_TYPES = {"failed": "failure", "interrupted": "failure", "partial": "warning", "complete": "success"}


class NotifyConfig(BaseModel):
    """`notify:` — which job statuses notify, and the apprise URLs to notify.

    PyYAML reads a bare `on:` key as the boolean true; such a key is taken as `on`."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    on: list[JobStatus] = ["failed", "partial"]  # pydantic copies a field's default
    urls: list[str] = []  # apprise URLs without a secret
    urls_env: list[str] = []  # names of environment variables, each holding one apprise URL
    urls_file: Path | None = None  # absolute; one apprise URL a line, '#' comments; readable by its owner only
    timeout_seconds: float = Field(30.0, gt=0, le=600)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and True in data and "on" not in data:
            return {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("urls")
    @classmethod
    def _no_secret_in_urls(cls, urls: list[str]) -> list[str]:
        for i, url in enumerate(urls):
            why = _secret_in(url)
            if why is not None:
                raise ValueError(f"the URL at urls[{i}] {why}; give such a URL in urls_env or urls_file")
            why = _apprise_refuses(url)
            if why is not None:
                raise ValueError(f"the URL at urls[{i}] {why}")
        return urls

    @field_validator("urls_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if not ENV_NAME.match(name):
                raise ValueError(f"urls_env[{i}] must be an environment variable's name (letters, digits, '_')")
        return names

    @field_validator("urls_file")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError("urls_file must be an absolute path")
        return path

    @model_validator(mode="after")
    def _somewhere(self) -> NotifyConfig:
        if not (self.urls or self.urls_env or self.urls_file):
            raise ValueError("set at least one of urls, urls_env or urls_file")
        return self


@dataclass(frozen=True)
class NotifyOutcome:
    """What notifying of one job's end did."""

    wanted: bool  # the job's status is in `on`
    targets: int = 0  # URLs tried
    sent: int = 0  # URLs apprise delivered to
    problems: tuple[str, ...] = ()  # one line each, secrets masked

    def to_json(self) -> dict[str, Any]:
        return {"wanted": self.wanted, "targets": self.targets, "sent": self.sent, "problems": list(self.problems)}


def job_message(report: dict[str, Any]) -> tuple[str, str]:
    """(title, body) for a job report dict (`BackupReport.to_json()`, with an optional `seconds`: the job's wall
    time, and `kind: "restore"` for a restore job). The body is plain text, at most `BODY_LIMIT` bytes; a name is
    printed as it is, its control characters escaped so that one VM is one line."""
    status = _text(report.get("status") or "unknown")
    job_id = _text(report.get("job_id") or report.get("job") or "?")
    vms = [v for v in report.get("vms") or () if isinstance(v, Mapping)]
    counts = _counts(report, vms)
    known = ("done", "failed", "unprotected", "skipped")
    order = [*known, *sorted(k for k in counts if k not in known)]
    said = ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k)) or "no VMs"
    title = _clip(f"vsphere-proxy: job {job_id} {status} ({said})", TITLE_LIMIT)

    lines = [f"job {job_id}: {status}",
             "VMs: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "failed", "skipped", "unprotected"))
             + "".join(f", {counts[k]} {k}" for k in order[len(known):])]
    moved = (f"restored {human_size(_number(report.get('bytes_read')))}" if report.get("kind") == "restore" else
             f"read {human_size(_number(report.get('bytes_read')))}, "
             f"stored {human_size(_number(report.get('bytes_written')))}")
    seconds = report.get("seconds")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        moved += f", took {_duration(seconds)}"
    lines.append(moved)
    fell_back = [f"{_text(v.get('vm'))}: {_text(v['fell_back'])}" for v in vms if v.get("fell_back")]
    lines += _section("fell back", fell_back)
    not_done = [f"{_text(v.get('vm'))}: {'unprotected: ' if v.get('status') == 'unprotected' else ''}"
                f"{_text(v.get('error') or 'no error recorded')}"
                for v in vms if v.get("status") in ("failed", "unprotected")]
    lines += _section("failed or unprotected", not_done)
    lines += _section("job problems", [_text(p) for p in report.get("problems") or ()])
    return title, _bounded([_clip(line, LINE_LIMIT) for line in lines], BODY_LIMIT)


def notify_job(config: NotifyConfig, report: dict[str, Any], *,
               environ: Mapping[str, str] | None = None) -> NotifyOutcome:
    """Send the job's summary to every configured URL when the job's status is in `config.on`; never raises for a
    delivery problem (a notification failure never fails the job) and returns within about `timeout_seconds`.

    `environ` (default `os.environ`) holds the variables `urls_env` names."""
    status = report.get("status")
    if status not in config.on:
        return NotifyOutcome(wanted=False)
    limit = config.timeout_seconds
    try:
        targets, problems = _targets(config, os.environ if environ is None else environ)
        if not targets:
            return NotifyOutcome(wanted=True, problems=tuple(problems) or ("notify: no URL to send to",))
        title, body = job_message(report)
    except Exception as e:  # a report of an unexpected shape: say so, the job goes on
        return NotifyOutcome(wanted=True, problems=(f"notify: could not prepare the message ({type(e).__name__})",))

    box: list[tuple[int, list[str]]] = []
    worker = threading.Thread(target=lambda: box.append(_deliver(targets, title, body, NOTIFY_TYPES[status], limit)),
                              name="vsphere-proxy-notify", daemon=True)
    worker.start()
    worker.join(limit)
    if not box:
        return NotifyOutcome(True, len(targets), 0, (*problems, f"notify: timed out after {limit:g} s"))
    sent, more = box[0]
    return NotifyOutcome(True, len(targets), sent, (*problems, *more))


@dataclass(frozen=True)
class _Target:
    url: str = field(repr=False)
    label: str  # what a problem line calls it: never a secret


def _targets(config: NotifyConfig, environ: Mapping[str, str]) -> tuple[list[_Target], list[str]]:
    """Every URL to notify, in order (`urls`, then `urls_env`, then `urls_file`), and the problems met finding them."""
    found: list[tuple[str, str | None]] = [(url, None) for url in config.urls]  # (url, where it came from if secret)
    problems: list[str] = []
    for name in config.urls_env:
        value = environ.get(name, "").strip()
        if value:
            found.append((value, f"environment variable {name}"))
        else:
            problems.append(f"notify: environment variable {name} is not set")
    if config.urls_file is not None:
        lines, problem = _read_urls_file(config.urls_file)
        if problem is not None:
            problems.append(problem)
        found += [(url, f"urls_file line {n}") for n, url in lines]
    targets = []
    for n, (url, where) in enumerate(found, start=1):
        label = f"{_shown(url)} (target {n})" if where is None else f"{_scheme(url)}://… (target {n}, {where})"
        targets.append(_Target(url, label))
    return targets, problems


def _read_urls_file(path: Path) -> tuple[list[tuple[int, str]], str | None]:
    """(line number, URL) of each URL in `path`, or a problem: not a regular file, not this user's, open to group or
    others, unreadable, holding no URL."""
    where = f"notify: urls_file {_text(str(path))}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        return [], f"{where}: cannot read ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return [], f"{where}: not a regular file"
        if st.st_uid != os.geteuid():
            return [], f"{where}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); chown it"
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            how = " and ".join(w for bits, w in ((0o044, "readable"), (0o022, "writable"), (0o011, "executable"))
                               if mode & bits)
            return [], f"{where}: {how} by group or others (mode {mode:o}); chmod 600 it"
        chunks: list[bytes] = []
        size = 0
        while size <= URLS_FILE_LIMIT and (chunk := os.read(fd, URLS_FILE_LIMIT + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        return [], f"{where}: cannot read ({e.strerror})"
    finally:
        os.close(fd)
    if len(data) > URLS_FILE_LIMIT:
        return [], f"{where}: larger than {URLS_FILE_LIMIT // 1024} KiB"
    urls = [(n, s) for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1)
            if (s := line.strip()) and not s.startswith("#")]
    return urls, None if urls else f"{where}: holds no URL"


def _deliver(targets: Sequence[_Target], title: str, body: str, notify_type: str,
             limit: float) -> tuple[int, list[str]]:
    """Send to every target with one apprise call; (targets delivered to, problems). Runs in the bounded thread."""
    problems: list[str] = []
    try:
        import apprise  # the import takes a tenth of a second: only a job that notifies pays it

        # apprise stops waiting for a target a little before the hard bound, so that a late one is named
        deadline = limit - min(1.0, limit * 0.2)
        asset = apprise.AppriseAsset(secure_logging=True, interpret_emojis=False, interpret_escapes=False)
        sender = apprise.Apprise(asset=asset)
        tags: dict[str, int] = {}
        for i, target in enumerate(targets):
            service = apprise.Apprise.instantiate(target.url, asset=asset, tag=f"vsphere-proxy-target-{i + 1}")
            if service is None:
                problems.append(f"notify: {target.label}: apprise cannot load this URL "
                                "(unknown scheme, malformed, or its plugin is unavailable here)")
                continue
            for attr in ("socket_connect_timeout", "socket_read_timeout"):  # the URL's cto and rto
                value = getattr(service, attr, None)
                if isinstance(value, int | float) and value > limit:
                    setattr(service, attr, limit)
            sender.add(service)
            tags[f"vsphere-proxy-target-{i + 1}"] = i
        if not tags:
            return 0, problems
        result = sender.notify(body=body, title=title, notify_type=apprise.NotifyType(notify_type),
                               body_format=apprise.NotifyFormat.TEXT, interpret_escapes=False, timeout=deadline)
        outcome: dict[int, Any] = {}
        for one in result:
            for tag in one.tag:
                if tag in tags:
                    outcome[tags[tag]] = one.status
        sent = 0
        for i in sorted(tags.values()):
            status = outcome.get(i)
            if status == apprise.AppriseResultStatus.SUCCESS:
                sent += 1
            elif status == apprise.AppriseResultStatus.TIMEOUT:
                problems.append(f"notify: {targets[i].label}: timed out (timeout_seconds {limit:g})")
            else:
                problems.append(f"notify: {targets[i].label}: not delivered")
        return sent, problems
    except Exception as e:  # apprise's own failure: the exception's text may quote a URL, so only its type is said
        return 0, [*problems, f"notify: apprise failed ({type(e).__name__})"]


def _secret_in(url: str) -> str | None:
    """Why `url` carries a secret (a password, a query parameter named like a secret), or None; never the secret."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "is not a URL"
    if not SCHEME.match(url):
        return "is not a URL (scheme://...)"
    if password:
        return "carries a password (user:password@)"
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        words = [w for w in re.split(r"[^a-z0-9]+", name.lower().lstrip("+-:")) if w]
        if value and any(w in SECRET_WORDS or w.endswith(SECRET_SUFFIXES) for w in words):
            return f"carries a secret in its query parameter {_clip(_text(name), 40)!r}"
    return None


def _apprise_refuses(url: str) -> str | None:
    """Why apprise cannot use `url` in the configuration file: it cannot load it, or it marks part of it private
    (a token in the path: Slack, Discord, Telegram...); or None."""
    try:
        import apprise

        service = apprise.Apprise.instantiate(url)
        if service is None:
            return "cannot be loaded by apprise (unknown scheme, malformed, or its plugin is unavailable here)"
        if service.url(privacy=True) != service.url(privacy=False):
            return "carries a secret (apprise masks part of it: a token or a key); give it in urls_env or urls_file"
    except Exception as e:
        return f"cannot be loaded by apprise ({type(e).__name__})"
    return None


def _scheme(url: str) -> str:
    m = SCHEME.match(url)
    return m.group(1).lower() if m else "(no scheme)"


def _shown(url: str) -> str:
    """A URL of `notify.urls` (no secret) as a problem line shows it: scheme, host and port."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            port = parts.port
        except ValueError:
            port = None
    except ValueError:
        return f"{_scheme(url)}://…"
    where = f"[{host}]" if ":" in host else host
    return _text(f"{_scheme(url)}://{where}{f':{port}' if port else ''}/…")


def _counts(report: Mapping[str, Any], vms: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = report.get("counts")
    if isinstance(counts, Mapping):
        return {str(k): int(_number(v)) for k, v in counts.items()}
    found: dict[str, int] = {}
    for v in vms:
        found[str(v.get("status"))] = found.get(str(v.get("status")), 0) + 1
    return found


def _section(heading: str, items: Sequence[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {item}" for item in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        shown.append(f"  … and {len(items) - LIST_LIMIT} more")
    return [f"{heading} ({len(items)}):", *shown]


def _bounded(lines: Sequence[str], limit: int) -> str:
    """The lines joined, cut at a line's end so that the text is at most `limit` bytes."""
    text = "\n".join(lines)
    if len(text.encode()) <= limit:
        return text
    marker = f"… (cut at {limit // 1024} KiB)"
    room, kept = limit - len(marker.encode()) - 1, []
    for line in lines:
        room -= len(line.encode()) + 1
        if room < 0:
            break
        kept.append(line)
    return "\n".join([*kept, marker])


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _text(value: Any) -> str:
    """`value` as text, every non-printable character (newline, tab, other controls) escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
