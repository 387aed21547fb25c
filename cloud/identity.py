"""Who is calling: the device identity that the TLS-terminating proxy verified.

Serve's gRPC proxy serves plaintext only (ray-project/ray#34103), so nginx terminates mTLS in
front of it, verifies the device's client certificate against the fleet CA and its CRL, and
forwards the certificate's common name as DEVICE_METADATA. nginx sets both headers below
itself, replacing any a client sent, so no client can choose them. The proxy's token proves
that a call came through the proxy: Serve's port listens on every interface, and a caller
that reaches it directly cannot know the token.
"""

import hmac
from collections.abc import Sequence

from tandem import envs
from tandem.contract import FieldError, check_name

# Set by the proxy from the verified client certificate's subject CN.
DEVICE_METADATA = "tandem-device"
# Set by the proxy to the value of TANDEM_PROXY_TOKEN (the cloud's environment).
PROXY_TOKEN_METADATA = "tandem-proxy-token"


class Unauthenticated(Exception):
    """The call did not come through the proxy with a verified device identity."""


def proxy_token(insecure: bool) -> bytes | None:
    """The proxy's token, read once when a deployment starts; None for an insecure development
    cloud. ValueError if it is unset: that cloud would refuse every call, and its callers, not
    its operator, would see why."""
    if insecure:
        return None
    if not envs.TANDEM_PROXY_TOKEN:
        raise ValueError("TANDEM_PROXY_TOKEN is not set: the deployments cannot tell calls through the TLS proxy "
                         "from direct ones (`tandem cloud serve` sets it; in Kubernetes, a Secret)")
    return envs.TANDEM_PROXY_TOKEN.encode()


def caller_device(metadata: Sequence[tuple[str, str]], claimed: str, token: bytes | None) -> str:
    """The calling device's id, a `contract.NAME` (ids name store partitions and record-id
    namespaces). Through the proxy (`token`, from `proxy_token`): the verified identity,
    whatever the message claims. Without a token (an insecure development cloud): the id the
    message claims, if any."""
    if token is None:
        return check_name("device_id", claimed) if claimed else ""
    values = dict(metadata)
    if not hmac.compare_digest(values.get(PROXY_TOKEN_METADATA, "").encode(), token):
        raise Unauthenticated("the call did not come through the TLS proxy; connect to its port with a device certificate")
    device = values.get(DEVICE_METADATA, "")
    if not device:
        raise Unauthenticated("no verified device certificate")
    try:
        # Device ids name store partitions and record-id namespaces: enrolment issues NAMEs only.
        return check_name(DEVICE_METADATA, device)
    except FieldError as exc:
        raise Unauthenticated(str(exc)) from None
