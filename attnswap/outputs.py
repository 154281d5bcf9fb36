"""Where attnswap writes, and how, so that nothing a user owns is lost (docs/reliability.md).

Every output (a checkpoint, an export, a run directory, a cache entry) is
- guarded: it may not be or contain an input (the source model, a data, calibration or recipe file), the
  working directory, the home directory, `/` or attnswap's cache; an existing output is replaced only with
  `--force`, and only if attnswap wrote every file in it (its `attnswap-manifest.json` lists them);
- locked: one writer per target, an `fcntl.flock` on `.NAME.attnswap-lock` beside it, held from the start of
  the command to the swap; a second writer fails at once;
- staged: built in a fresh directory beside the target (`.NAME.attnswap-tmp-*`), fsynced, given its
  manifest (names, sizes, sha256) and swapped in by two renames. A failure removes the staging directory; a
  kill leaves it, and the next writer of the target removes it. A kill between the two renames leaves the
  old output as `.NAME.attnswap-old-*`, which the next writer of the target renames back.
Resumable work (a fine-tune, an evolution) stages in `.NAME.attnswap-run` instead, which a failure keeps
and no cleanup removes: `--resume` continues it, `--force` discards it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from . import faults
from .errors import AttnswapError, OutputExists, WriteError

MANIFEST = "attnswap-manifest.json"
# attnswap's own scratch entries beside or inside an output: locks, staging, set-aside old outputs, runs
_SCRATCH = re.compile(r"^\..+\.attnswap-(lock|tmp-.+|old-.+|run)$")
# errors of writing (as opposed to reading a bad input): reported as "could not write", exit code 4
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}

Guard = tuple[str, "str | os.PathLike | None"]


def user_path(path: str | os.PathLike) -> Path:
    """A path option as the user meant it: `~` expanded (also after `--out=`, where the shell leaves it)."""
    return Path(os.path.expanduser(os.fspath(path)))


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(user_path(path)))


def cache_root() -> Path:
    """attnswap's cache (GGUF files converted to HF directories): $ATTNSWAP_CACHE or ~/.cache/attnswap."""
    return user_path(os.environ.get("ATTNSWAP_CACHE") or Path.home() / ".cache" / "attnswap")


def writer_process() -> bool:
    """True except in the non-zero ranks of a multi-process run (torchrun, accelerate): only rank 0 writes."""
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _holds_files(directory: Path) -> bool:
    return any(os.scandir(directory))


def inputs(source=None, **files) -> list[Guard]:
    """The guards for a command's inputs: the source model (when it is a local path) and files by role,
    e.g. inputs("runs/sw", data="x.txt", calibration=None) -> [("the source model", ...), ("the data file", ...)]."""
    guards: list[Guard] = []
    if source is not None and os.path.lexists(user_path(source)):
        guards.append(("the source model", source))
    for role, path in files.items():
        for p in path if isinstance(path, (list, tuple)) else [path]:
            if p is not None and os.path.lexists(user_path(p)):
                guards.append((f"the {role.replace('_', ' ')} file", p))
    return guards


def check_out(out: str | os.PathLike, force: bool = False, protect: Iterable[Guard] = (),
              flag: str = "--out", internal: bool = False) -> Path:
    """Validate an output target before any work; returns its real path. Nothing is created.

    `protect`: (what, path) pairs the output may not be or contain, beside the ones always protected
    (`internal`: attnswap's own cache entries, which live under the home directory and the cache).
    An existing empty directory counts as absent (there is nothing in it to lose).
    """
    real = _real(out)
    always = [] if internal else [("the root directory", "/"), ("the home directory", Path.home()),
                                  ("the working directory", Path.cwd()), ("attnswap's model cache", cache_root())]
    for what, path in [*always, *protect]:
        if path is None:
            continue
        inside = _real(path)
        if inside == real or real in inside.parents:
            verb = "is" if inside == real else "contains"
            raise AttnswapError(f"refusing {flag} '{out}': it {verb} {what} ({path}); choose another directory")
    if _leftovers(real):  # a dead run's scratch: restore / remove it now, under the lock, before judging
        with lock(real):
            recover(real)
    if os.path.lexists(real):
        if not real.is_dir():
            raise AttnswapError(f"{flag} '{out}' exists and is not a directory")
        if _holds_files(real):
            if not force:
                raise OutputExists(f"output '{out}' already exists; pass --force to replace it "
                                   "(only an output attnswap wrote is replaced)")
            check_owned(real, out)
    return real


# ---------------------------------------------------------------------------------------------- ownership

def _files(root: Path) -> Iterator[str]:
    """Relative paths of the files under `root`, attnswap's scratch entries left out."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _SCRATCH.match(d))
        for d in list(dirnames):
            if (here / d).is_symlink():  # a link to a folder: an entry of its own, never followed
                dirnames.remove(d)
                filenames.append(d)
        for f in sorted(filenames):
            if not _SCRATCH.match(f):
                yield (here / f).relative_to(root).as_posix()


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return manifest if isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


# what attnswap 0.1.0 wrote into its outputs (it wrote no manifest)
_LEGACY_TOP = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
               "chat_template*", "sentencepiece*", "spiece.model", "README.md", "metrics.json", "losses.json",
               "recipe.yaml", "results.json", "evolve.json", "evolve.tmp")
_LEGACY_RUN_STAGES = ("converted", "distilled", "finetuned", "final")


def _legacy_owned(rel: PurePosixPath) -> bool:
    head, rest = rel.parts[0], PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else None
    if rest is None:
        return any(rel.match(p) for p in _LEGACY_TOP)
    if head in _LEGACY_RUN_STAGES:
        return _legacy_owned(rest)
    if head == "adapter":
        return len(rest.parts) == 1 and rest.name in ("adapter_config.json", "adapter_model.safetensors", "README.md")
    if head == "checkpoints":
        return (len(rest.parts) == 2 and (rest.match("step-*/*") or rest.match(".tmp-step-*/*"))
                and rest.name in ("trainable.safetensors", "optim.pt", "state.json"))
    return head == ".final-tmp"  # 0.1.0's staging folder inside a fine-tune output


def _legacy_output(directory: Path) -> bool:
    """An output of attnswap 0.1.0: an `attnswap` config section, results.json or fine-tune checkpoints."""
    try:
        if "attnswap" in json.loads((directory / "config.json").read_text()):
            return True
    except (OSError, ValueError, TypeError):
        pass
    return (directory / "results.json").is_file() or any(directory.glob("checkpoints/*/state.json"))


def check_owned(directory: Path, label: str | os.PathLike | None = None) -> None:
    """Raise unless attnswap wrote every file in `directory` (its manifest, or 0.1.0's known file names)."""
    label = label or directory
    manifest = _read_manifest(directory)
    if manifest is None and not _legacy_output(directory):
        first = next(_files(directory), None)
        raise AttnswapError(f"refusing to replace '{label}': '{first}' in it was not written by attnswap (the folder "
                            f"has no {MANIFEST}); move it away or choose another --out")
    listed = set(manifest["files"]) | {MANIFEST} if manifest is not None else None
    for rel in _files(directory):
        owned = rel in listed if listed is not None else _legacy_owned(PurePosixPath(rel))
        if not owned:
            raise AttnswapError(f"refusing to replace '{label}': '{rel}' in it was not written by attnswap; "
                                "move it away or choose another --out")


# ---------------------------------------------------------------------------------------------- manifests

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """List every file under `directory` with its size and sha256 in `attnswap-manifest.json`."""
    from . import __version__

    files = {rel: {"size": (directory / rel).stat().st_size, "sha256": _sha256(directory / rel)}
             for rel in _files(directory) if rel != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"written_by": f"attnswap {__version__}", "files": files},
                                                 indent=1, sort_keys=True))


def verify(directory: Path) -> str | None:
    """None if every file the manifest lists is there with its size and checksum; else what is wrong."""
    manifest = _read_manifest(directory)
    if manifest is None:
        return f"no readable {MANIFEST}"
    for rel, meta in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta.get("size"):
            return f"{rel} has {path.stat().st_size} bytes, not {meta.get('size')}"
        if _sha256(path) != meta.get("sha256"):
            return f"{rel} does not match its checksum"
    return None


def add_files(directory: Path, files: dict[str, str]) -> None:
    """Write text files into a finished output (each atomically) and bring its manifest up to date."""
    for name, text in files.items():
        write_atomic(directory / name, text)
    if (directory / MANIFEST).exists():
        write_manifest(directory)


# ---------------------------------------------------------------------------------------------- locks

_held: dict[Path, int] = {}  # target -> depth, for the locks this process holds (re-entrant)


@contextlib.contextmanager
def lock(target: str | os.PathLike, *, wait: bool = False) -> Iterator[None]:
    """Hold the advisory lock of `target` (re-entrant within a process). Without `wait`, a target another
    process holds is a one-line error at once."""
    target = _real(target)
    if target in _held:
        _held[target] += 1
        try:
            yield
        finally:
            _held[target] -= 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.attnswap-lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise AttnswapError(f"another attnswap process is writing '{target}' now (it holds {path.name}); "
                                "wait for it to finish or choose another --out") from None
        # the holder before us unlinks the file on release: if ours is no longer the one at `path`, go again
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[target] = 1
    try:
        yield
    finally:
        del _held[target]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _scratch_of(target: Path) -> tuple[list[Path], list[Path]]:
    """(set-aside old outputs, staging folders) that runs of `target` may have left beside it: attnswap's own
    names, and 0.1.0's (`.NAME.old-PID`, `.NAME.tmp-XXXXXXXX` from mkdtemp) when they are folders."""
    parent = target.parent
    if not parent.is_dir():
        return [], []
    name = glob.escape(target.name)
    legacy_old = re.compile(rf"^\.{re.escape(target.name)}\.old-\d+$")
    legacy_tmp = re.compile(rf"^\.{re.escape(target.name)}\.tmp-[a-z0-9_]{{8}}$")
    olds = sorted(parent.glob(f".{name}.attnswap-old-*")) + sorted(
        p for p in parent.glob(f".{name}.old-*") if legacy_old.match(p.name) and p.is_dir())
    tmps = sorted(parent.glob(f".{name}.attnswap-tmp-*")) + sorted(
        p for p in parent.glob(f".{name}.tmp-*") if legacy_tmp.match(p.name) and p.is_dir())
    return olds, tmps


def _leftovers(target: Path) -> bool:
    """Whether dead runs may have left scratch for `target`: staging folders or a set-aside old output."""
    olds, tmps = _scratch_of(target)
    return bool(olds or tmps)


def recover(target: Path) -> None:
    """Under the target's lock: rename back an old output a kill left set aside mid-swap, and remove the
    staging folders and set-aside outputs of dead runs (including attnswap 0.1.0's names)."""
    olds, tmps = _scratch_of(target)
    if olds and not os.path.lexists(target):
        os.replace(olds.pop(0), target)
        warn(f"restored '{target}' (a replacement of it was interrupted)")
    for stale in [*olds, *tmps]:
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_scratch(root: Path) -> None:
    """Remove the staging leftovers of dead writers anywhere inside `root` (a run directory we hold)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [*dirnames, *filenames]:
            if _SCRATCH.match(entry) and ".attnswap-tmp-" in entry:
                _remove(Path(dirpath) / entry)
        dirnames[:] = [d for d in dirnames if not _SCRATCH.match(d)]


@contextlib.contextmanager
def claim(out: str | os.PathLike, *, force: bool = False, protect: Iterable[Guard] = (),
          wait: bool = False, internal: bool = False) -> Iterator[Path]:
    """At the start of a command: validate `out`, take its lock, recover what dead runs left, validate again
    (a restored output counts). Yields the real target path; the lock is held until the block ends."""
    protect = list(protect)
    check_out(out, force, protect, internal=internal)
    with lock(out, wait=wait):
        recover(_real(out))
        yield check_out(out, force, protect, internal=internal)


# ---------------------------------------------------------------------------------------------- staging

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_modes(root: Path) -> None:
    """Give every file and folder of an output the permissions a new one gets under the umask (some writers,
    like mkdtemp and tempfile-based savers, make them private: 0600 / 0700)."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _new_stage(target: Path) -> Path:
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.attnswap-tmp-"))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700: outputs get the permissions of any new folder
    return stage


def run_dir(target: str | os.PathLike) -> Path:
    """Where the resumable run that will become `target` works: `.NAME.attnswap-run` beside it."""
    target = _real(target)
    return target.parent / f".{target.name}.attnswap-run"


def _run_stage(target: Path, out, *, force: bool, resume: bool, progress: str, carry: tuple[str, ...]) -> Path:
    run = run_dir(target)
    if run.is_dir() and not any(run.glob(progress)):
        shutil.rmtree(run)  # a run that died before saving any progress: nothing to resume in it
    if run.is_dir():
        if resume:
            _remove_scratch(run)
            return run
        if not force:
            raise AttnswapError(f"an interrupted run of '{out}' is in '{run}'; pass --resume to continue it or "
                                "--force to discard it")
        shutil.rmtree(run)
    elif resume and not (target.is_dir() and any(target.glob(progress))):
        raise AttnswapError(f"nothing to resume for '{out}': no interrupted run beside it and no saved "
                            f"progress ({progress}) in it")
    run.mkdir()
    if resume:  # continue a finished output (more steps): its saved progress goes to the new run
        for name in carry:
            src = target / name
            if src.is_dir():
                shutil.copytree(src, run / name, ignore=shutil.ignore_patterns(".*"))
            elif src.is_file():
                shutil.copy2(src, run / name)
    return run


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _seal(folder: Path) -> None:
    """A finished folder, before its rename: its manifest, normal permissions, everything fsynced."""
    write_manifest(folder)
    normal_modes(folder)
    fsync_tree(folder)


def _swap(stage: Path, target: Path, out, *, replace: bool, label: str) -> None:
    old = None
    if os.path.lexists(target):
        # checked again here: the output may have appeared, or gained a user's file, while we worked
        if _holds_files(target):
            if not replace:
                raise OutputExists(f"output '{out}' appeared while this run worked; pass --force to replace it")
            check_owned(target, out)
        old = target.parent / f".{target.name}.attnswap-old-{os.getpid()}-{secrets.token_hex(3)}"
        os.replace(target, old)
        faults.point(f"{label}.swap")
    os.replace(stage, target)
    _fsync_dir(target.parent)
    faults.point(f"{label}.swapped")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_error(e: BaseException, out) -> WriteError | None:
    """A disk-full or permission failure as a one-line error (safetensors reports them as its own error)."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        return WriteError(f"could not write '{out}': {e.strerror}{where}; nothing was replaced and the partial "
                          "output was removed")
    if type(e).__name__ == "SafetensorError" and any(s in str(e) for s in ("No space", "too large", "denied")):
        return WriteError(f"could not write '{out}': {str(e).splitlines()[0][:160]}; nothing was replaced and "
                          "the partial output was removed")
    return None


@contextlib.contextmanager
def writing(out: str | os.PathLike, *, force: bool = False, protect: Iterable[Guard] = (), wait: bool = False,
            label: str = "output", progress: str | None = None, resume: bool = False,
            carry: tuple[str, ...] = (), internal: bool = False) -> Iterator[Path]:
    """Yield a directory to build the output `out` in; when the block ends it becomes `out`, whole.

    On success the directory gets its manifest, is fsynced and swapped in (an old output is replaced only if
    `force`, or `resume`, allows). On failure or Ctrl-C it is removed and the old output stays.
    `progress` (a glob, e.g. 'checkpoints/step-*/state.json') makes it a resumable run directory instead: kept
    on failure once it holds progress, continued with `resume`, discarded by `force`; on `resume` of a finished
    output the `carry` entries of that output are copied in first.
    """
    replace = force or resume
    with claim(out, force=replace, protect=protect, wait=wait, internal=internal) as target:
        if progress is None:
            stage = _new_stage(target)
        else:
            stage = _run_stage(target, out, force=force, resume=resume, progress=progress, carry=carry)
        try:
            faults.point(f"{label}.staged")
            yield stage
            faults.point(f"{label}.written")
            _seal(stage)
            _swap(stage, target, out, replace=replace, label=label)
        except BaseException as e:
            if progress is None or not any(stage.glob(progress)):
                shutil.rmtree(stage, ignore_errors=True)
            mapped = write_error(e, out)
            if mapped is not None:
                raise mapped from None
            raise


@contextlib.contextmanager
def atomic_folder(final: Path, label: str = "folder") -> Iterator[Path]:
    """A folder inside a directory this process holds (a checkpoint in a run directory): yields a scratch
    folder beside `final`; when the block ends it gets a manifest and normal permissions, is fsynced and
    renamed to `final` (replacing one there). On failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.attnswap-tmp-"))
    try:
        yield tmp
        _seal(tmp)
        faults.point(f"{label}_written")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: Path, text: str, label: str = "state") -> None:
    """Replace one text file whole: written beside it, fsynced, renamed over it."""
    write_file(path, lambda tmp: tmp.write_text(text), label=label)


def write_file(path: Path, writer, label: str = "file") -> None:
    """Replace one file whole with what `writer(tmp_path)` writes (e.g. a plot; the temp name keeps the
    suffix, which decides the format): written beside it, fsynced, renamed over it; removed on failure."""
    path = user_path(path)
    tmp = path.parent / f".{path.name}.attnswap-tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}"
    try:
        writer(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        faults.point(f"{label}.written")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        mapped = write_error(e, path)
        if mapped is not None:
            raise mapped from None
        raise
    _fsync_dir(path.parent)
