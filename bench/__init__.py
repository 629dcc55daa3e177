"""moorline's benchmark harness: moorline, nginx, HAProxy and (in the HTTP/1.1 scenarios) the
calibration floor measured in the same run on the same machine, through the real proxy path (a
backend behind each proxy). See bench/README.md.

Modules: ``cli`` (command line and process-wide setup), ``scenarios`` (what is measured and the
interleaved round loop), ``proxies`` (starting the backend and each proxy), ``configs``
(equivalent configurations), ``measure`` (wrk, iperf3, the idle-connection client),
``children`` (child processes and ``/proc`` readers), ``report`` (medians, ratios, JSON,
Markdown, chart), ``idleclient`` and ``floor`` (the calibration forwarder), both run as child
processes.
"""
