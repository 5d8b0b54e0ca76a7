"""Settings for the example project that Gatehouse's tests, compose file and
locust runs put behind the gateway. Everything deployment-specific comes from
the environment, with defaults that work on a laptop (SQLite)."""
import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "0") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "*").split(",")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "stories",
    # Cache tags on responses and invalidation from outside HTTP
    # (`manage.py cache_invalidate`): the gateway's Django helper.
    "gatehouse_cache",
]

# The gateway's Redis and key prefix, for `gatehouse_cache.invalidate`.
GATEHOUSE_CACHE = {
    "REDIS_URL": os.environ.get(
        "GATEHOUSE_REDIS_URL", os.environ.get("DJANGO_REDIS_URL", "redis://localhost:6379/0")
    ),
    "KEY_PREFIX": os.environ.get("GATEHOUSE_CACHE_PREFIX", "muejam"),
}

MIDDLEWARE = [
    "stories.middleware.RequestContextMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    # ETag on every response and 304 to If-None-Match: what the gateway's
    # cache revalidates with.
    "django.middleware.http.ConditionalGetMiddleware",
]

# Sessions: in the database by default; DJANGO_SESSION_ENGINE picks another
# backend (signed_cookies, or cache / cached_db with DJANGO_REDIS_URL).
SESSION_ENGINE = "django.contrib.sessions.backends." + os.environ.get(
    "DJANGO_SESSION_ENGINE", "db"
)
if os.environ.get("DJANGO_REDIS_URL"):
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": os.environ["DJANGO_REDIS_URL"],
        }
    }

ROOT_URLCONF = "muejam_library.urls"
WSGI_APPLICATION = "muejam_library.wsgi.application"


def _database():
    """PostgreSQL when DB_NAME is set (through `gatehouse db`: DB_HOST is its
    socket directory), else SQLite."""
    name = os.environ.get("DB_NAME")
    if not name:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("DJANGO_SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": os.environ.get("DB_USER", ""),
        "PASSWORD": os.environ.get("DB_PASSWORD", ""),
        "HOST": os.environ.get("DB_HOST", os.environ.get("DB_PRIMARY_HOST", "")),
        "PORT": os.environ.get("DB_PORT", ""),
        # Transaction pooling: server-side cursors cannot outlive a transaction.
        "DISABLE_SERVER_SIDE_CURSORS": True,
        # Seconds a worker keeps its connection (0: one per request).
        "CONN_MAX_AGE": int(os.environ.get("DB_CONN_MAX_AGE", "0")),
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

USE_TZ = os.environ.get("DJANGO_USE_TZ", "1") == "1"
TIME_ZONE = os.environ.get("DJANGO_TIME_ZONE", "UTC")
LANGUAGE_CODE = "en-us"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "WARNING")},
}
