"""Engines execute the coordinator's assignments: embedded (proxies as thread pools in this process) and,
later, distributed (proxies as Celery workers). Both implement one `Engine` protocol."""
