"""The admin port: health, readiness, Prometheus metrics and the web dashboard.

- app.py: the FastAPI app and the server thread the daemon runs
- auth.py: login, sessions, bearer token, CSRF
- context.py: what the daemon hands over (settings, database, engines, rules)
- health.py: /readyz's checks (also behind `cadnode status`)
- metrics.py: /metrics, computed from the database at each scrape
- data.py, charts.py, thumbnails.py, views.py, templates/, static/: the dashboard
"""
