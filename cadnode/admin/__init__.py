"""The admin port: health, readiness, Prometheus metrics and the web dashboard.

- app.py: the FastAPI app and the server thread the daemon runs
- guard.py: the ASGI middleware in front of every route: authentication before any body is
  read, and each route's body-size limit
- auth.py: login, sessions, bearer token, CSRF
- throttle.py: what credential checks may cost: a bounded Argon2 pool, failures per address
- context.py: what the daemon hands over (settings, database, engines, rules)
- health.py: /readyz's checks (also behind `cadnode status`)
- metrics.py: /metrics, computed from the database at each scrape
- data.py, charts.py, thumbnails.py, views.py, templates/, static/: the dashboard
"""
