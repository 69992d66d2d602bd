"""moto_server with one change, for Keyless's AWS tests: ``python moto_keyless.py [moto_server args]``.

With request authentication enforced (``INITIAL_NO_AUTH_ACTION_COUNT`` / ``/moto-api/reset-auth``),
moto demands a SigV4 signature on every action. AWS itself does not sign
``AssumeRoleWithWebIdentity``: the web identity token is the authentication. This wrapper exempts
that one action from moto's signature check and instead verifies the token as AWS would, against
the identity provider's keys (Keyless's JWKS, file named by ``KEYLESS_TEST_JWKS``) and the
``sts.amazonaws.com`` audience. Everything else (S3, Secrets Manager, IAM policies, and the
signature checks on the temporary credentials STS hands out) is moto's own code.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jwt
from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.exceptions import InvalidClientTokenIdError
from moto.server import main

_moto_check = ActionAuthenticatorMixin._authenticate_and_authorize_action
ACCEPTED: list[str] = []


def _check(self: Any, iam_request_cls: type, resource: str = "*") -> None:
    if self._get_action() != "AssumeRoleWithWebIdentity":
        return _moto_check(self, iam_request_cls, resource)
    token = self._get_param("WebIdentityToken") or ""
    with open(os.environ["KEYLESS_TEST_JWKS"]) as f:
        keys = jwt.PyJWKSet.from_dict(json.load(f))
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        key = next(k for k in keys.keys if k.key_id == kid)
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com")
    except (jwt.PyJWTError, StopIteration):
        raise InvalidClientTokenIdError() from None
    print(f"web identity accepted for sub={claims['sub']}", flush=True)
    return None


ActionAuthenticatorMixin._authenticate_and_authorize_action = _check  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
