#!/usr/bin/env python3
"""Offline checks of the Bicep deployment template in deploy/.

No Bicep compiler can be installed here (it ships as a .NET tool and as a
download, neither reachable offline), so this script does what can be done
with real parsers and the Azure SDK's own resource models:

1. Syntax: every .bicep file parses with the tree-sitter Bicep grammar with no
   ERROR or MISSING node, and with pycep-parser (a second, independent Lark
   grammar) which also gives the structure used below.
2. Parameters file: JSON, the ARM deployment-parameters shape, every key a
   parameter of main.bicep, every parameter without a default present, value
   types, @allowed values and @minLength/@maxLength/@minValue/@maxValue of
   literal values; `${VAR}` placeholders (azd substitutes them) only for string
   parameters; no literal value for a @secure() parameter.
3. Modules: the file exists, every parameter passed is declared by the module,
   every required module parameter is passed.
4. Resource bodies of Microsoft.App/* and Microsoft.Cache/redis: the template's
   API version is the one the pinned Azure SDK was generated from, and every
   property name the template writes exists, at that nesting, in the SDK's
   models of that API version and is writable (not read-only).
5. The deployment contract of issue 14 (see README.md, "Deploy to Azure").

What is NOT checked: Bicep's type checker and linter (expressions, function
signatures, scope rules, `existing` references), the ARM JSON the compiler
would emit, resource types other than those in (4), and anything Azure
decides at deployment time (quota, name availability, region support, role
propagation). Run `az bicep build` / `az deployment group what-if` with
network access for those.

Usage: validate.py [DEPLOY_DIR]   (exit 0 when every check passes)
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OPENAI_USER_ROLE = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd"
PUBLIC_PORT = 8000
ADMIN_PORT = 8001
# Top-level keys of a resource body that ARM takes from the URL or that are
# Bicep-only; the SDK models do not carry them as writable properties.
BICEP_ONLY_KEYS = {"name", "dependsOn", "scope", "parent"}


def rel(path: Path) -> str:
    """A path for messages: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


class Failures:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.items.append(f"{where}: {msg}")


# ---- 1. syntax -----------------------------------------------------------


def syntax_errors(path: Path) -> list[str]:
    """ERROR / MISSING nodes of the tree-sitter Bicep grammar, with positions."""
    import tree_sitter_bicep
    from tree_sitter import Language, Parser

    parser = Parser(Language(tree_sitter_bicep.language()))
    tree = parser.parse(path.read_bytes())
    out: list[str] = []
    stack = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            line, col = node.start_point
            kind = "missing " + node.type if node.is_missing else "syntax error"
            text = node.text.decode(errors="replace")[:40] if node.text else ""
            out.append(f"{line + 1}:{col + 1}: {kind} near {text!r}")
        stack.extend(node.children)
    return sorted(out)


def parse_structure(path: Path) -> dict:
    from pycep import BicepParser

    return BicepParser().parse(text=path.read_text())


# ---- helpers over pycep's JSON -------------------------------------------


def unwrap(cfg):
    """Strips pycep's `condition` / `loop_type` wrappers off a body."""
    while isinstance(cfg, dict) and "config" in cfg and ("condition" in cfg or "loop_type" in cfg):
        cfg = cfg["config"]
    return cfg


def is_expr(v) -> bool:
    return isinstance(v, dict) and len(v) == 1 and ("operator" in v or "function" in v)


class Template:
    def __init__(self, path: Path, tree: dict) -> None:
        self.path = path
        self.tree = tree
        self.params: dict = tree.get("parameters") or {}
        self.vars: dict = tree.get("variables") or {}
        self.resources: dict = tree.get("resources") or {}
        self.modules: dict = tree.get("modules") or {}

    def decorators(self, param: str) -> dict:
        out = {}
        for d in self.params[param].get("decorators") or []:
            out[d["type"]] = d.get("argument", True)
        return out

    def required_params(self) -> list[str]:
        return [n for n, p in self.params.items() if p.get("default") is None]

    def resolve(self, v, depth: int = 0):
        """Follows variable names to their values; parameter names to their
        defaults when `defaults` is wanted by the caller (see resolve_default)."""
        if depth > 20:
            return v
        if isinstance(v, str) and v in self.vars:
            return self.resolve(self.vars[v]["value"], depth + 1)
        return v

    def resolve_default(self, v):
        v = self.resolve(v)
        if isinstance(v, str) and v in self.params:
            return self.params[v].get("default")
        return v

    def alternatives(self, v, depth: int = 0) -> list:
        """Every literal shape an expression can take: variables followed,
        both sides of a conditional, every argument of concat()/union()."""
        if depth > 20:
            return [v]
        v = self.resolve(v)
        if is_expr(v):
            if "operator" in v and v["operator"]["type"] == "conditional":
                ops = v["operator"]["operands"]
                return self.alternatives(ops["true_value"], depth + 1) + self.alternatives(
                    ops["false_value"], depth + 1
                )
            if "function" in v and v["function"]["type"] in ("concat", "union"):
                out = []
                for arg in v["function"]["parameters"].values():
                    out.extend(self.alternatives(arg, depth + 1))
                return out
        return [v]

    def items(self, v) -> list:
        """Elements of an array-valued expression (all alternatives)."""
        out = []
        for alt in self.alternatives(v):
            if isinstance(alt, list):
                for e in alt:
                    out.extend(self.alternatives(e))
        return out

    def resources_of_type(self, rtype: str) -> list[tuple[str, dict]]:
        return [(n, r) for n, r in self.resources.items() if r["type"].lower() == rtype.lower()]


# ---- 2. parameters file ----------------------------------------------------

PLACEHOLDER = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
JSON_TYPES = {
    "string": str,
    "int": int,
    "bool": bool,
    "array": list,
    "object": dict,
}


def check_parameters_file(tpl: Template, path: Path, f: Failures) -> None:
    where = rel(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        f.add(where, f"not JSON: {e}")
        return
    schema = doc.get("$schema", "")
    if "deploymentParameters.json" not in schema:
        f.add(where, "$schema is not the ARM deploymentParameters schema")
    if doc.get("contentVersion") != "1.0.0.0":
        f.add(where, "contentVersion must be 1.0.0.0")
    params = doc.get("parameters")
    if not isinstance(params, dict):
        f.add(where, "no `parameters` object")
        return
    for name, entry in params.items():
        w = f"{where}: parameters.{name}"
        if name not in tpl.params:
            f.add(w, "not a parameter of main.bicep")
            continue
        if not isinstance(entry, dict) or ("value" in entry) == ("reference" in entry):
            f.add(w, "needs exactly one of `value` or `reference`")
            continue
        decos = tpl.decorators(name)
        ptype = tpl.params[name]["type"]
        if "reference" in entry:
            if "secure" not in decos:
                f.add(w, "a Key Vault reference is only for @secure() parameters")
            continue
        value = entry["value"]
        if "secure" in decos:
            if not (isinstance(value, str) and PLACEHOLDER.match(value)):
                f.add(w, "@secure() parameter with a literal value: pass it at deployment time")
            continue
        if isinstance(value, str) and PLACEHOLDER.match(value):
            if ptype != "string":
                f.add(w, f"`${{VAR}}` placeholder for a {ptype} parameter (only strings are substituted)")
            continue
        pytype = JSON_TYPES.get(ptype)
        if pytype is None:
            f.add(w, f"unknown parameter type {ptype}")
            continue
        if not isinstance(value, pytype) or (pytype is int and isinstance(value, bool)):
            f.add(w, f"expected {ptype}, got {type(value).__name__}")
            continue
        check_decorators(w, value, decos, f)
    for name in tpl.required_params():
        if name not in params:
            f.add(where, f"required parameter `{name}` (no default in main.bicep) is missing")


def check_decorators(w: str, value, decos: dict, f: Failures) -> None:
    allowed = decos.get("allowed")
    if allowed is not None and value not in allowed:
        f.add(w, f"{value!r} is not one of {allowed}")
    if isinstance(value, (str, list)):
        if "min_length" in decos and len(value) < decos["min_length"]:
            f.add(w, f"shorter than @minLength({decos['min_length']})")
        if "max_length" in decos and len(value) > decos["max_length"]:
            f.add(w, f"longer than @maxLength({decos['max_length']})")
    if isinstance(value, int) and not isinstance(value, bool):
        if "min_value" in decos and value < decos["min_value"]:
            f.add(w, f"below @minValue({decos['min_value']})")
        if "max_value" in decos and value > decos["max_value"]:
            f.add(w, f"above @maxValue({decos['max_value']})")


def check_defaults(tpl: Template, f: Failures) -> None:
    """Literal defaults obey their own decorators."""
    for name, p in tpl.params.items():
        d = p.get("default")
        if d is None or is_expr(d):
            continue
        pytype = JSON_TYPES.get(p["type"])
        w = f"{rel(tpl.path)}: param {name}"
        if pytype and not isinstance(d, pytype):
            f.add(w, f"default is not a {p['type']}")
            continue
        check_decorators(w, d, tpl.decorators(name), f)


# ---- 3. modules -------------------------------------------------------------


def check_modules(tpl: Template, loaded: dict[Path, Template], f: Failures) -> None:
    for name, mod in tpl.modules.items():
        w = f"{rel(tpl.path)}: module {name}"
        target = (tpl.path.parent / mod["detail"]["path"]).resolve()
        if target not in loaded:
            f.add(w, f"{mod['detail']['path']} does not exist")
            continue
        callee = loaded[target]
        body = unwrap(mod["config"])
        passed = body.get("params") or {}
        for p in passed:
            if p not in callee.params:
                f.add(w, f"passes `{p}`, which {target.name} does not declare")
        for p in callee.required_params():
            if p not in passed:
                f.add(w, f"does not pass required `{p}` of {target.name}")


# ---- 4. resource bodies against the Azure SDK models ------------------------


class Schema:
    """Property names of one Azure SDK model class, for both generator styles
    (TypeSpec `rest_field` models and msrest `_attribute_map` models)."""

    def __init__(self, module) -> None:
        self.module = module

    def fields(self, cls) -> dict[str, tuple[object, bool]]:
        """rest name -> (type, writable)."""
        out: dict[str, tuple[object, bool]] = {}
        if hasattr(cls, "_attribute_map"):  # msrest style, flattened keys
            validation = getattr(cls, "_validation", {})
            for attr, spec in cls._attribute_map.items():
                readonly = validation.get(attr, {}).get("readonly", False)
                out[spec["key"]] = (spec["type"], not readonly)
            return out
        hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
        for klass in reversed(cls.__mro__):
            for attr, rf in vars(klass).items():
                if attr.startswith("_") or not hasattr(rf, "_rest_name_input"):
                    continue
                rest = rf._rest_name_input or attr
                vis = getattr(rf, "_visibility", None)
                writable = vis is None or "create" in vis or "update" in vis
                out[rest] = (hints.get(attr), writable)
        return out

    def model_of(self, t):
        """The model class inside a type (Optional/list/dict unwrapped);
        ('list'|'dict', model) for containers; None for scalars."""
        if isinstance(t, str):  # msrest type string
            if t.startswith("[") and t.endswith("]"):
                inner = self.model_of(t[1:-1])
                return ("list", inner) if inner else None
            if t.startswith("{") and t.endswith("}"):
                inner = self.model_of(t[1:-1])
                return ("dict", inner) if inner else None
            cls = getattr(self.module, t, None)
            return cls if isinstance(cls, type) else None
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if origin is typing.Union:
            for a in args:
                m = self.model_of(a)
                if m is not None:
                    return m
            return None
        if origin in (list, typing.List):
            inner = self.model_of(args[0]) if args else None
            return ("list", inner) if inner else None
        if origin in (dict, typing.Dict):
            inner = self.model_of(args[1]) if len(args) > 1 else None
            return ("dict", inner) if inner else None
        if isinstance(t, type) and (hasattr(t, "_attribute_map") or hasattr(t, "_is_model")):
            return t
        return None


def walk_body(tpl: Template, schema: Schema, cls, body, path: str, f: Failures, where: str) -> None:
    for alt in tpl.alternatives(body):
        if not isinstance(alt, dict) or is_expr(alt):
            continue
        fields = schema.fields(cls)
        # msrest flattens `properties.x` into the parent model.
        flat_props = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("properties.")}
        for key, value in alt.items():
            if key in BICEP_ONLY_KEYS and path == "":
                continue
            k = key.strip("'")
            if k == "properties" and flat_props and "properties" not in fields:
                walk_flat(tpl, schema, flat_props, value, f"{path}properties.", f, where)
                continue
            if k not in fields:
                f.add(where, f"`{path}{k}` is not a property of {cls.__name__} in this API version")
                continue
            ftype, writable = fields[k]
            if not writable:
                f.add(where, f"`{path}{k}` is read-only")
            descend(tpl, schema, ftype, value, f"{path}{k}.", f, where)


def walk_flat(tpl, schema, flat: dict, body, path, f, where) -> None:
    for alt in tpl.alternatives(body):
        if not isinstance(alt, dict) or is_expr(alt):
            continue
        for key, value in alt.items():
            if key not in flat:
                f.add(where, f"`{path}{key}` is not a property in this API version")
                continue
            ftype, writable = flat[key]
            if not writable:
                f.add(where, f"`{path}{key}` is read-only")
            descend(tpl, schema, ftype, value, f"{path}{key}.", f, where)


def descend(tpl, schema, ftype, value, path, f, where) -> None:
    model = schema.model_of(ftype)
    if model is None:
        return
    if isinstance(model, tuple):
        kind, inner = model
        if kind == "list":
            for el in tpl.items(value):
                walk_body(tpl, schema, inner, el, path[:-1] + "[]." if path else "", f, where)
        else:
            for alt in tpl.alternatives(value):
                if isinstance(alt, dict) and not is_expr(alt):
                    for k, v in alt.items():
                        walk_body(tpl, schema, inner, v, f"{path}{k}.", f, where)
        return
    walk_body(tpl, schema, model, value, path, f, where)


SDK_RESOURCES = {
    # resource type -> (SDK models module, SDK configuration module, model class)
    "Microsoft.App/containerApps": ("azure.mgmt.appcontainers", "ContainerApp"),
    "Microsoft.App/managedEnvironments": ("azure.mgmt.appcontainers", "ManagedEnvironment"),
    "Microsoft.Cache/redis": ("azure.mgmt.redis", "RedisCreateParameters"),
}


def sdk_api_version(package: str) -> str:
    import importlib

    conf = importlib.import_module(package + "._configuration")
    src = Path(conf.__file__).read_text()
    m = re.search(r'kwargs\.pop\("api_version", "([0-9a-z-]+)"\)', src)
    return m.group(1) if m else "?"


def check_sdk_models(tpl: Template, f: Failures) -> list[str]:
    import importlib

    checked = []
    for rname, res in tpl.resources.items():
        spec = SDK_RESOURCES.get(res["type"])
        if spec is None or res.get("existing"):
            continue
        package, clsname = spec
        where = f"{rel(tpl.path)}: resource {rname} ({res['type']})"
        want = sdk_api_version(package)
        if res["api_version"] != want:
            f.add(where, f"API version {res['api_version']}, but the models checked are {want} ({package})")
            continue
        models = importlib.import_module(package + ".models")
        schema = Schema(models)
        walk_body(tpl, schema, getattr(models, clsname), unwrap(res["config"]), "", f, where)
        checked.append(f"{res['type']}@{want}")
    return checked


# ---- 5. the deployment contract ---------------------------------------------


def gateway_drain_seconds() -> float:
    """drain_delay + shutdown_grace defaults, read from the gateway's code."""
    src = (REPO / "crates/aoai-lb/src/config.rs").read_text()
    total = 0.0
    for field in ("drain_delay", "shutdown_grace"):
        m = re.search(field + r": Duration::from_(secs|millis)\((\d+)\)", src)
        if not m:
            raise SystemExit(f"cannot find the default of {field} in config.rs; update deploy/validate.py")
        total += int(m.group(2)) / (1000.0 if m.group(1) == "millis" else 1.0)
    return total


def prop(v, *keys):
    for k in keys:
        if not isinstance(v, dict):
            return None
        v = v.get(k)
    return v


def check_contract(main: Template, loaded: dict[Path, Template], f: Failures) -> None:
    w = rel(main.path)

    # Role assignments: on an `existing` resource, never a resource group.
    for t in loaded.values():
        for rname, res in t.resources_of_type("Microsoft.Authorization/roleAssignments"):
            body = unwrap(res["config"])
            scope = body.get("scope")
            target = t.resources.get(scope) if isinstance(scope, str) else None
            if not target or not target.get("existing"):
                f.add(f"{rel(t.path)}: {rname}", "role assignment not scoped to an existing resource")
    role_modules = [
        (n, m)
        for n, m in main.modules.items()
        if OPENAI_USER_ROLE
        in json.dumps(loaded[(main.path.parent / m["detail"]["path"]).resolve()].tree)
    ]
    if not role_modules:
        f.add(w, f"no module assigns role {OPENAI_USER_ROLE}")
    for n, m in role_modules:
        callee = loaded[(main.path.parent / m["detail"]["path"]).resolve()]
        accounts = callee.resources_of_type("Microsoft.CognitiveServices/accounts")
        if not accounts or not all(r.get("existing") for _, r in accounts):
            f.add(w, f"module {n}: the Azure OpenAI account must be an `existing` reference")
        loop = prop(m, "config", "loop_type", "detail", "array_name")
        if loop != "openAiAccounts":
            f.add(w, f"module {n} must run once per entry of openAiAccounts")

    apps = main.resources_of_type("Microsoft.App/containerApps")
    if len(apps) != 1:
        f.add(w, "expected exactly one container app")
        return
    _, app = apps[0]
    body = unwrap(app["config"])
    props = body.get("properties", {})
    ingress = prop(props, "configuration", "ingress") or {}
    if ingress.get("external") is not True or main.resolve_default(ingress.get("targetPort")) != PUBLIC_PORT:
        f.add(w, f"ingress must be external on port {PUBLIC_PORT}")
    extra = [main.resolve(p) for p in main.items(ingress.get("additionalPortMappings", []))]
    admin = [p for p in extra if isinstance(p, dict) and main.resolve_default(p.get("targetPort")) == ADMIN_PORT]
    if not admin or any(p.get("external") is not False for p in admin):
        f.add(w, f"admin port {ADMIN_PORT} must be mapped with external: false")
    if any(p.get("external") is not False for p in extra if isinstance(p, dict)):
        f.add(w, "no additional port may be external")

    if prop(body, "identity", "type") != "UserAssigned":
        f.add(w, "the app must use a user-assigned identity")

    secrets = {
        main.resolve(s).get("name") for s in main.items(prop(props, "configuration", "secrets")) if isinstance(s, dict)
    }
    template = props.get("template", {})
    grace = main.resolve_default(template.get("terminationGracePeriodSeconds"))
    drain = gateway_drain_seconds()
    if not isinstance(grace, int) or grace <= drain:
        f.add(w, f"terminationGracePeriodSeconds ({grace}) must exceed the gateway's drain ({drain:g} s)")

    containers = main.items(template.get("containers", []))
    if len(containers) != 1:
        f.add(w, "expected one container")
        return
    c = containers[0]
    probes = {p.get("type"): p for p in main.items(c.get("probes", [])) if isinstance(p, dict)}
    for kind, path in (("Liveness", "/healthz"), ("Readiness", "/readyz")):
        p = probes.get(kind)
        if (
            not p
            or prop(p, "httpGet", "path") != path
            or main.resolve_default(prop(p, "httpGet", "port")) != PUBLIC_PORT
        ):
            f.add(w, f"{kind} probe must be HTTP GET {path} on {PUBLIC_PORT}")

    secure_params = {n for n in main.params if "secure" in main.decorators(n)}
    env = [e for e in main.items(c.get("env", [])) if isinstance(e, dict)]
    names = {e.get("name") for e in env}
    for required in ("OPENAI_INSTANCES", "API_KEY"):
        if required not in names:
            f.add(w, f"env {required} is missing")
    for e in env:
        if e.get("name") in ("OPENAI_INSTANCES", "API_KEY") and "secretRef" not in e:
            f.add(w, f"env {e.get('name')} must come from a secret (secretRef)")
        if "secretRef" in e and e["secretRef"] not in secrets:
            f.add(w, f"env {e.get('name')}: secretRef {e['secretRef']!r} names no secret")
        if json.dumps(e.get("value")).strip('"') in secure_params:
            f.add(w, f"env {e.get('name')} holds a @secure() parameter as a plain value")

    scale = template.get("scale", {})
    rules = [r for r in main.items(scale.get("rules", [])) if isinstance(r, dict)]
    http_rules = [r for r in rules if "http" in r]
    if not http_rules:
        f.add(w, "no HTTP scale rule")
    # `metadata` is a free-form map in the API, so the models cannot catch a
    # misspelt key here.
    for r in http_rules:
        if "concurrentRequests" not in (prop(r, "http", "metadata") or {}):
            f.add(w, f"HTTP scale rule {r.get('name')!r} needs metadata.concurrentRequests")
    if not isinstance(main.resolve_default(scale.get("minReplicas")), int) or main.resolve_default(
        scale.get("minReplicas")
    ) < 1:
        f.add(w, "minReplicas must default to at least 1")

    envs = main.resources_of_type("Microsoft.App/managedEnvironments")
    if not envs or prop(unwrap(envs[0][1]["config"]), "properties", "appLogsConfiguration", "destination") != (
        "log-analytics"
    ):
        f.add(w, "the environment must send its logs to Log Analytics")
    if not main.resources_of_type("Microsoft.OperationalInsights/workspaces"):
        f.add(w, "no Log Analytics workspace")

    for rname, res in main.resources_of_type("Microsoft.Cache/redis"):
        rb = unwrap(res["config"]).get("properties", {})
        if rb.get("enableNonSslPort") is not False or rb.get("minimumTlsVersion") != "1.2":
            f.add(w, f"{rname}: TLS only (enableNonSslPort false, minimumTlsVersion 1.2)")
    if main.resources_of_type("Microsoft.Cache/redis"):
        block = [a for a in main.alternatives("redisBlock") if isinstance(a, dict) and "redis" in a]
        keys = set(block[0]["redis"]) if block else set()
        if not {"url", "password"} <= keys:
            f.add(w, "the redis block handed to the gateway needs `url` and `password`")


# ---- driver -------------------------------------------------------------------


def main(argv: list[str]) -> int:
    deploy = Path(argv[1]).resolve() if len(argv) > 1 else REPO / "deploy"
    f = Failures()
    files = sorted(deploy.rglob("*.bicep"))
    loaded: dict[Path, Template] = {}
    for p in files:
        errs = syntax_errors(p)
        for e in errs:
            f.add(rel(p), e)
        if errs:
            continue
        try:
            loaded[p.resolve()] = Template(p, parse_structure(p))
        except Exception as e:  # pycep raises plain exceptions on bad input
            f.add(rel(p), f"pycep-parser rejects it: {str(e).splitlines()[0]}")
    main_path = (deploy / "main.bicep").resolve()
    checked: list[str] = []
    if main_path in loaded:
        main_t = loaded[main_path]
        check_defaults(main_t, f)
        for t in loaded.values():
            check_modules(t, loaded, f)
        check_parameters_file(main_t, deploy / "main.parameters.json", f)
        checked = check_sdk_models(main_t, f)
        check_contract(main_t, loaded, f)
    elif not f.items:
        f.add(str(deploy), "main.bicep missing")
    if f.items:
        for item in f.items:
            print(f"FAIL {item}")
        print(f"deploy template: {len(f.items)} problem(s)")
        return 1
    print(
        f"deploy template: {len(files)} Bicep files parse (tree-sitter-bicep, pycep-parser); "
        f"main.parameters.json matches main.bicep; property names checked against "
        f"{', '.join(checked)}; deployment contract holds"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
