"""`linewatch config check | schema | example`: the config file without starting the daemon.

    linewatch config check FILE        what `serve` validates before it opens a socket: the YAML and
    linewatch config check -c FILE     every key, the TLS and CurveZMQ key files, the bank (it loads,
                                       fits the detector settings and the false-reject target) and the
                                       models it needs (checkpoints found and loaded); the file as
                                       the positional argument or as -c/--config, like every command
    linewatch config schema            JSON schema of the config (for editors: YAML language servers)
    linewatch config example           the annotated reference config: every key, its default, its meaning

The reference config ships inside the package (linewatch/reference.yaml; configs/reference.yaml in
the repository is a link to it), so an installed wheel has it too.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

EXIT_USAGE = 2
REFERENCE_CONFIG = "reference.yaml"


def reference_config_text() -> str:
    """The annotated reference config shipped with the package."""
    return resources.files("linewatch").joinpath(REFERENCE_CONFIG).read_text()


def config_schema() -> dict:
    """JSON schema (draft 2020-12, as pydantic writes it) of the whole config file."""
    from linewatch.config import Config

    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "linewatch configuration"
    return schema


def check_config(path: str, bank: str | None = None, config_only: bool = False) -> list[str]:
    """Validate like `serve` does before it starts; returns what was checked (one line each).

    Raises the user-error exceptions `linewatch` maps to exit status 2 (ConfigError, BankError,
    WeightsError, SecurityError, ...) with the message naming the file and key at fault.
    """
    from linewatch.config import ConfigError, load_config

    config = load_config(path)
    done = [f"config: {path} is valid (every key known, every value in range)"]
    rt = config.runtime
    if rt.metrics.tls_cert_file:
        from linewatch.runtime.ops.health import server_tls_context

        try:
            server_tls_context(rt.metrics)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
        done.append(f"metrics TLS: certificate {rt.metrics.tls_cert_file} and its key load")
    if rt.security.enabled:
        from linewatch.runtime.transport.security import allowed_keys_folder, load_secret_key

        load_secret_key(rt.security.server_secret_key)
        allowed_keys_folder(rt.security.frame_senders, "runtime.security.frame_senders")
        allowed_keys_folder(rt.security.verdict_subscribers, "runtime.security.verdict_subscribers")
        done.append("CurveZMQ: the server key and both allow-list folders load")
    if rt.mqtt.enabled and (rt.mqtt.password_file or rt.mqtt.tls):
        from linewatch.runtime.sinks.mqtt_client import client_tls_context, read_password

        if rt.mqtt.password_file:
            read_password(rt.mqtt.password_file)
            done.append(f"MQTT: the password file {rt.mqtt.password_file} holds a password")
        if rt.mqtt.tls:
            client_tls_context(rt.mqtt)
            loaded = [f"CA certificates {rt.mqtt.tls_ca_file or '(the system ones)'}"]
            if rt.mqtt.tls_cert_file:
                loaded.append(f"client certificate {rt.mqtt.tls_cert_file} and its key")
            done.append(f"MQTT TLS: {', '.join(loaded)} load")
    done += _check_actuate(config)
    if config_only:
        return done
    from linewatch.detector.manifest import BankError, read_manifest

    bank_path = Path(bank or config.bank.path)
    if not bank_path.is_file():
        raise BankError(f"{bank_path}: no bank file here (bank.path{'' if bank is None else ' / --bank'}); build one "
                        f"with `linewatch bank build -c {path} --good GOOD_DIR --validation HELD_OUT_DIR --out "
                        f"{bank_path}`, or check only the file with --config-only")
    # a corrupt or unfitting bank is told before the models start
    read_manifest(bank_path).check_fits(config, source=f"bank {bank_path}")
    from linewatch.recipe import load_processor

    inspector, _ = load_processor(config, bank_path)
    done.append(f"models: {config.detector.backend} backend built on {inspector.device}")
    done.append(f"bank: {bank_path} ({inspector.bank_id}, {inspector.bank.size} good images) fits the detector "
                f"settings and the false-reject target {config.calibration.target_false_reject_rate}")
    if rt.selfcheck.enabled:
        from linewatch.selfcheck_references import load_references

        try:
            references = load_references(rt.selfcheck, inspector)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        good = sum(r.expected == "pass" for r in references)
        done.append(f"selfcheck: {good} good and {len(references) - good} bad reference(s) load, each of the bank's "
                    "frame size")
    return done


def _check_actuate(config) -> list[str]:
    """The `actuate:` section (`linewatch actuate`): its timing was checked when the file loaded;
    here the files an OPC UA output reads. The PLC itself is checked by `linewatch actuate` at start."""
    from linewatch.config import ConfigError

    settings = config.actuate
    if not settings.cameras:
        return []
    done = [f"actuate: {len(settings.cameras)} camera(s), each travel time longer than runtime.pipeline.deadline_ms "
            f"({config.runtime.pipeline.deadline_ms:g} ms); output {settings.output}"]
    if settings.output == "opcua" and (settings.opcua.password_file or settings.opcua.certificate_file):
        from linewatch.actuate.outputs import OutputError, certificate_uri, read_password

        try:
            if settings.opcua.password_file:
                read_password(settings.opcua.password_file)
                done.append(f"actuate OPC UA: the password file {settings.opcua.password_file} holds a password")
            if settings.opcua.certificate_file:
                uri = certificate_uri(settings.opcua.certificate_file)
                done.append(f"actuate OPC UA: certificate {settings.opcua.certificate_file} loads (application URI {uri})")
        except OutputError as e:
            raise ConfigError(f"actuate.opcua: {e}") from None
    return done


def config_check_file(file: str | None, config: str | None) -> str:
    """The config file `config check` was given: the positional FILE or -c/--config FILE (one of
    them; both only when they name the same file). Raises ValueError (the message) otherwise."""
    if file is None and config is None:
        raise ValueError("config check: no config file given (`linewatch config check FILE` or `-c FILE`)")
    if file is not None and config is not None and Path(file).resolve() != Path(config).resolve():
        raise ValueError(f"config check: two different config files given ({file} and -c {config}); give one")
    return file if file is not None else config  # type: ignore[return-value]


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        path = config_check_file(args.file, args.config)
    except ValueError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for line in check_config(path, bank=args.bank, config_only=args.config_only):
        print(f"ok  {line}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_schema(), indent=2))
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    sys.stdout.write(reference_config_text())
    return 0


def register(subparsers) -> None:
    """Add `config check|schema|example` to the `linewatch` argument parser's subparsers."""
    config = subparsers.add_parser("config", help="check a config file, print its JSON schema or the reference config")
    actions = config.add_subparsers(dest="action", required=True)
    p = actions.add_parser("check", help="validate a config (and its bank and models) as `serve` would, without starting")
    p.add_argument("file", nargs="?", help="YAML config file (or give it as -c/--config FILE)")
    p.add_argument("--config", "-c", help="YAML config file (the same as the positional FILE)")
    p.add_argument("--bank", "-b", help="bank file (default: bank.path from the config)")
    p.add_argument("--config-only", action="store_true",
                   help="check the file and the key files it names, not the bank and models (no bank needed)")
    p.set_defaults(func=cmd_config_check)
    p = actions.add_parser("schema", help="JSON schema of the config file, for editors")
    p.set_defaults(func=cmd_config_schema)
    p = actions.add_parser("example", help="the annotated reference config (every key with its default)")
    p.set_defaults(func=cmd_config_example)
