"""The packaging stage (``--package ollama|lmstudio|all``): ready-to-load folders around a finished GGUF.

It runs after export and verification, consumes the GGUF as written (never re-quantizes) and the source
checkpoint's tokenizer_config / chat template / generation_config / config, and writes:

* ``Modelfile`` next to the GGUF (Ollama), then ``ollama create`` when an ``ollama`` binary is on PATH;
* ``lmstudio/<publisher>/<Model>-GGUF/<Model>-<TYPE>.gguf`` (a hard link, else a copy) and ``README.md``;
* ``manifest.json``: every file of the run with its size and sha256, written last.

A multimodal checkpoint's vision tower (``mmproj-*.gguf``, written beside the text GGUF) goes into both: a second
``FROM`` line in the Modelfile (Ollama stores a GGUF of architecture ``clip`` as the model's projector layer), and
a link beside the LM Studio copy (LM Studio pairs an ``mmproj*.gguf`` with the model in its folder).

Everything that can be decided before quantizing is (``plan``), so a bad chat template or an existing
output fails in seconds, not after an hour. After export, ``finish`` writes the files under temporary names
and renames them into place together (``publish``), then report.json and manifest.json; on failure it
removes what it wrote, leaving the GGUF and report.json as a run without ``--package`` would.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from qcompile import __version__, report
from qcompile.errors import QCompileError, UsageError
from qcompile.packaging import chat_template, lmstudio, ollama
from qcompile.packaging import templates as T
from qcompile.report_types import Report


def parse_targets(value: str | None) -> tuple[str, ...]:
    """``ollama`` / ``lmstudio`` / ``all`` (or a comma list) -> the package targets, in a fixed order."""
    if not value:
        return ()
    names = {v.strip().lower() for v in value.split(",") if v.strip()}
    if "all" in names:
        names = set(T.TARGETS)
    unknown = names - set(T.TARGETS)
    if unknown or not names:
        raise UsageError(f"--package {value}: choose ollama, lmstudio or all")
    return tuple(t for t in T.TARGETS if t in names)


@dataclass
class Plan:
    """What the stage will write, decided before quantization."""
    targets: tuple[str, ...]
    out: Path
    artifact: Path                   # the final GGUF path
    model_dir: Path
    repo: str | None
    model_name: str
    scheme: str
    modelfile: ollama.Modelfile | None = None
    ollama_name: str | None = None
    template_info: dict | None = None
    lm_folder: Path | None = None
    lm_gguf: Path | None = None
    license_id: str | None = None
    quiet: bool = False
    projector: Path | None = None    # the mmproj GGUF written beside the artifact (multimodal checkpoints)

    @cached_property
    def projector_sha256(self) -> str:
        """The projector's hash, read once: the manifest lists it and its LM Studio link is the same inode."""
        return report.sha256_file(self.projector)

    @property
    def lm_projector(self) -> Path | None:
        """The projector's place in the LM Studio folder (its own file name: LM Studio matches ``mmproj``)."""
        return self.lm_folder / self.projector.name if self.lm_folder is not None and self.projector else None

    @property
    def outputs(self) -> list[Path]:
        paths = [self.out / T.MANIFEST]
        if self.modelfile is not None:
            paths.append(self.out / T.MODELFILE)
        if self.lm_gguf is not None:
            paths += [self.lm_gguf, self.lm_folder / "README.md"]
        if self.lm_projector is not None:
            paths.append(self.lm_projector)
        return paths


def plan(targets: tuple[str, ...], *, out: Path, artifact: Path, model_dir: Path, name: str, repo: str | None,
         scheme: str, force: bool, quiet: bool = False, projector: Path | None = None) -> Plan:
    """Read the source checkpoint's metadata, build the Modelfile and check its template; refuse existing
    package outputs unless ``force``. ``projector``: the mmproj file the export writes beside ``artifact``."""
    p = Plan(targets, out, artifact, model_dir, repo, repo.split("/")[-1] if repo else name, scheme,
             license_id=lmstudio.license_of(model_dir), quiet=quiet, projector=projector)
    if "ollama" in targets:
        _plan_ollama(p)
    if "lmstudio" in targets:
        publisher = repo.split("/")[0] if repo else T.DEFAULT_PUBLISHER
        p.lm_folder, p.lm_gguf = lmstudio.layout(out / T.LMSTUDIO_DIR, publisher, p.model_name, scheme)
    existing = [x for x in p.outputs if x.exists()]
    if existing and not force:
        raise QCompileError(f"{existing[0]} already exists (use --force to overwrite)")
    return p


def _plan_ollama(p: Plan) -> None:
    tpl = chat_template.load(p.model_dir)
    spec = chat_template.probe(tpl) if tpl is not None else None
    template = ollama.build_template(spec) if spec is not None else None
    system = spec.default_system if spec is not None else None
    p.ollama_name = ollama.ollama_name(p.model_name, p.scheme)
    header = T.MODELFILE_HEADER.format(
        name=p.artifact.name, version=__version__, source=p.repo or p.model_dir,
        license=f" (license: {p.license_id})" if p.license_id else "", ollama_name=p.ollama_name,
        modelfile=T.MODELFILE)
    p.modelfile = ollama.Modelfile(p.artifact.name, template, system,
                                   ollama.stop_tokens(p.model_dir, chatml=spec is not None),
                                   ollama.sampling_parameters(p.model_dir), header,
                                   projector=p.projector.name if p.projector else None)
    p.modelfile.text()  # a value Ollama's parser cannot read back fails now, not after quantizing
    if spec is None:
        p.template_info = {"source": None, "note": "the checkpoint has no chat template; Ollama sends prompts raw"}
        return
    check = ollama.check_template(template, tpl, spec, system)
    p.template_info = {"source": "Qwen ChatML", "tools": spec.tools is not None,
                       "default_system": system is not None, "checked_renders": check.conversations,
                       "equivalent": check.equal, "mismatches": check.mismatches}
    for m in check.mismatches:
        print(f"qcompile: warning: the Ollama template differs from the model's chat template: {m}",
              file=sys.stderr)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def publish(p: Plan, rep: Report) -> dict:
    """Write the package files (all or nothing) and run ``ollama create``; return report.json's
    ``package`` section."""
    (p.out / T.MANIFEST).unlink(missing_ok=True)  # it described a previous run (--force)
    staged: list[tuple[Path, Path]] = []
    made_dirs: list[Path] = []
    done: list[Path] = []
    section: dict = {"targets": list(p.targets)}
    known: dict[Path, tuple[str, bool]] = {}  # a GGUF's place in the LM Studio folder: (its hash, hard-linked)
    try:
        if p.modelfile is not None:
            staged.append(_stage_text(p.out / T.MODELFILE, p.modelfile.text()))
        if p.lm_gguf is not None:
            for d in reversed([p.lm_folder, *p.lm_folder.parents]):
                if not d.exists() and p.out in d.parents:
                    d.mkdir()
                    made_dirs.append(d)
            tmp, how = _stage_gguf(p.artifact, p.lm_gguf)
            known[p.lm_gguf] = (rep.artifact.sha256, how == "hardlink")
            staged.append((tmp, p.lm_gguf))
            section["lmstudio"] = {"folder": p.lm_folder.relative_to(p.out).as_posix(), "gguf": how}
            if p.lm_projector is not None:
                tmp, how = _stage_gguf(p.projector, p.lm_projector)
                known[p.lm_projector] = (p.projector_sha256, how == "hardlink")
                staged.append((tmp, p.lm_projector))
                section["lmstudio"]["projector"] = p.lm_projector.name
            card = lmstudio.model_card(rep, model_name=p.model_name, repo=p.repo, license_id=p.license_id,
                                       file_name=p.lm_gguf.name)
            staged.append(_stage_text(p.lm_folder / "README.md", card))
        files = []
        for tmp, final in staged:
            # a hard link is the GGUF's own inode: its hash is known; a copy is hashed, and must match
            expected, linked = known.get(final, (None, False))
            sha = expected if linked else report.sha256_file(tmp)
            if expected is not None and sha != expected:
                raise QCompileError(f"{final}: the copy's sha256 differs from the original's")
            files.append({"path": final.relative_to(p.out).as_posix(), "bytes": tmp.stat().st_size, "sha256": sha})
        for tmp, final in staged:
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for f in done:
            f.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    section["files"] = files
    if p.modelfile is not None:
        if not p.quiet and shutil.which("ollama"):
            print(f"ollama create {p.ollama_name} -f {p.out / T.MODELFILE}", file=sys.stderr)
        section["ollama"] = {"modelfile": T.MODELFILE, "name": p.ollama_name, "template": p.template_info,
                             "system": p.modelfile.system, "stop": p.modelfile.stops,
                             **({"projector": p.modelfile.projector} if p.modelfile.projector else {}),
                             "parameters": p.modelfile.parameters,
                             "create": ollama.create(p.ollama_name, p.out / T.MODELFILE)}
    return section


def _stage_text(final: Path, text: str) -> tuple[Path, Path]:
    tmp = _tmp(final)
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, final


def _stage_gguf(src: Path, final: Path) -> tuple[Path, str]:
    """A hard link to the GGUF under a temp name (no second copy of gigabytes), else a full copy."""
    tmp = _tmp(final)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        return tmp, "hardlink"
    except OSError:
        pass   # another filesystem, or one without hard links
    try:
        shutil.copyfile(src, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, "copy"


def finish(p: Plan, rep: Report, report_path: Path) -> None:
    """The whole stage after export: package files, report.json with a ``package`` section, manifest.json
    last. A failure removes the package files and restores the plain report; a failed ``ollama create``
    raises only once everything is written."""
    section = publish(p, rep)
    try:
        rep.package = section
        report.write_report(report_path, rep)
        write_manifest(p, rep, report_path)
    except BaseException:
        rep.package = None
        for f in [p.out / T.MANIFEST, *(p.out / x["path"] for x in section["files"])]:
            f.unlink(missing_ok=True)
        if p.lm_folder is not None:
            for d in [p.lm_folder, *p.lm_folder.parents]:
                if d == p.out or p.out not in d.parents:
                    break
                try:
                    d.rmdir()
                except OSError:
                    break
        report.write_report(report_path, rep)
        raise
    check_create(section)


def write_manifest(p: Plan, rep: Report, report_path: Path) -> Path:
    """``manifest.json``: every file this run wrote (GGUF, report.json, package files) with size and
    sha256; written last, atomically."""
    files = [{"path": p.artifact.name, "bytes": rep.artifact.bytes, "sha256": rep.artifact.sha256},
             {"path": report_path.relative_to(p.out).as_posix(), "bytes": report_path.stat().st_size,
              "sha256": report.sha256_file(report_path)},
             *rep.package["files"]]
    if p.projector is not None:
        files.append({"path": p.projector.relative_to(p.out).as_posix(), "bytes": p.projector.stat().st_size,
                      "sha256": p.projector_sha256})
    doc = {"schema_version": 1, "tool": f"qcompile {__version__}", "files": sorted(files, key=lambda f: f["path"])}
    path = p.out / T.MANIFEST
    report.atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def check_create(section: dict) -> None:
    """Raise when ``ollama create`` ran and failed (after everything is written: the files are fine and the
    command can be rerun by hand)."""
    c = (section.get("ollama") or {}).get("create") or {}
    if c.get("ran") and not c.get("ok"):
        cmd = f"ollama create {section['ollama']['name']} -f {c['command'][-1]}"
        raise QCompileError(f"`{cmd}` failed (exit {c['returncode']}): {c['message'] or 'no output'}; "
                            "the package files are written, rerun that command once Ollama works")
