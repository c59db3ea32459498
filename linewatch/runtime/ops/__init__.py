"""Operations: Prometheus metrics, /healthz and /readyz, structured logs, the control socket."""
