"""Names of the `DeepSeekV4Deployment` API (docs/operator.md): one place for the group, version, kind and plurals."""

GROUP = "dsv4.io"
VERSION = "v1alpha1"
KIND = "DeepSeekV4Deployment"
PLURAL = "deepseekv4deployments"
SINGULAR = "deepseekv4deployment"
SHORT_NAMES = ("dsv4",)
CRD_NAME = f"{PLURAL}.{GROUP}"
API_VERSION = f"{GROUP}/{VERSION}"
