"""Built-in extensions. Importing this package registers them all in ``moorline.config.registry``.

Each module registers itself by Envoy name and type URL at import time; the core never imports a
filter by name.
"""

import moorline.filters.http.buffer
import moorline.filters.http.health_check
import moorline.filters.listener.http_inspector
import moorline.filters.listener.tls_inspector
import moorline.observability.access_log
import moorline.proxy.hcm
import moorline.proxy.tcp_proxy  # noqa: F401
