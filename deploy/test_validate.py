"""The checker in validate.py rejects what it claims to reject.

Each test copies deploy/ to a temporary directory, breaks one thing, and
expects validate.py to fail naming it; the unbroken copy must pass.
Run: python -m unittest deploy/test_validate.py (scripts/check-deploy.sh does).
"""

import contextlib
import io
import json
import shutil
import tempfile
import unittest
from pathlib import Path

import validate

DEPLOY = Path(__file__).resolve().parent


class BrokenTemplate(unittest.TestCase):
    def run_on(self, edit):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "deploy"
            shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
            edit(copy)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = validate.main(["validate.py", str(copy)])
            return code, out.getvalue()

    def sub(self, rel, old, new):
        def edit(copy):
            p = copy / rel
            text = p.read_text()
            self.assertIn(old, text, f"fixture drifted: {old!r} not in {rel}")
            p.write_text(text.replace(old, new, 1))

        return edit

    def params(self, change):
        def edit(copy):
            p = copy / "main.parameters.json"
            doc = json.loads(p.read_text())
            change(doc["parameters"])
            p.write_text(json.dumps(doc))

        return edit

    def assert_rejected(self, edit, needle):
        code, out = self.run_on(edit)
        self.assertEqual(code, 1, out)
        self.assertIn(needle, out)

    def test_accepts_the_shipped_template(self):
        code, out = self.run_on(lambda copy: None)
        self.assertEqual(code, 0, out)

    def test_rejects_a_syntax_error(self):
        self.assert_rejected(self.sub("main.bicep", "userAssignedIdentities: {", "userAssignedIdentities: {{"), "syntax error")

    def test_rejects_a_misspelt_property(self):
        self.assert_rejected(
            self.sub("main.bicep", "successThreshold: 1", "successTreshold: 1"),
            "probes[].successTreshold` is not a property",
        )

    def test_rejects_an_api_version_the_models_do_not_describe(self):
        self.assert_rejected(
            self.sub("main.bicep", "containerApps@2025-01-01", "containerApps@2023-05-01"), "API version 2023-05-01"
        )

    def test_rejects_an_unknown_parameter_in_the_parameters_file(self):
        self.assert_rejected(self.params(lambda p: p.update(replicas={"value": 3})), "not a parameter of main.bicep")

    def test_rejects_a_missing_required_parameter(self):
        self.assert_rejected(self.params(lambda p: p.pop("image")), "required parameter `image`")

    def test_rejects_a_wrongly_typed_value(self):
        self.assert_rejected(self.params(lambda p: p.update(minReplicas={"value": "1"})), "expected int")

    def test_rejects_a_value_outside_the_allowed_set(self):
        self.assert_rejected(self.params(lambda p: p.update(cpu={"value": "3.0"})), "is not one of")

    def test_rejects_a_literal_secret_in_the_parameters_file(self):
        self.assert_rejected(self.params(lambda p: p.update(apiKey={"value": "sk-123"})), "@secure() parameter")

    def test_rejects_a_module_parameter_the_module_does_not_declare(self):
        self.assert_rejected(
            self.sub("main.bicep", "accountName: account.name", "account: account.name"), "does not declare"
        )

    def test_rejects_a_role_assigned_on_the_resource_group(self):
        self.assert_rejected(
            self.sub("modules/openai-user-role.bicep", "scope: account", "scope: resourceGroup()"),
            "not scoped to an existing resource",
        )

    def test_rejects_a_grace_period_not_above_the_drain(self):
        self.assert_rejected(
            self.sub("main.bicep", "terminationGracePeriodSeconds int = 45", "terminationGracePeriodSeconds int = 31"),
            "must exceed the gateway's drain",
        )

    def test_rejects_a_public_admin_port(self):
        self.assert_rejected(
            self.sub("main.bicep", "external: false\n            targetPort: adminPort", "external: true\n            targetPort: adminPort"),
            "admin port 8001",
        )

    def test_rejects_a_readiness_probe_on_the_wrong_path(self):
        self.assert_rejected(self.sub("main.bicep", "path: '/readyz'", "path: '/ready'"), "Readiness probe")

    def test_rejects_the_client_key_as_a_plain_environment_value(self):
        self.assert_rejected(self.sub("main.bicep", "secretRef: 'api-key'", "value: apiKey"), "API_KEY must come from a secret")

    def test_rejects_a_secret_reference_to_no_secret(self):
        self.assert_rejected(
            self.sub("main.bicep", "secretRef: 'openai-instances'", "secretRef: 'openai-instance'"), "names no secret"
        )

    def test_rejects_an_http_scale_rule_without_its_threshold(self):
        self.assert_rejected(
            self.sub("main.bicep", "concurrentRequests: string", "concurrentRequest: string"), "concurrentRequests"
        )


if __name__ == "__main__":
    unittest.main()
