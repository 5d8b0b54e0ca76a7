"""Django's side of the gatehouse response cache.

Tag responses, so that a write can make every page that shows an object
stale at once, and invalidate tags from outside HTTP (a Celery task, an
admin action, the shell): the gateway drops what they tag, in every
gateway instance, before the call returns.

Settings (all optional)::

    GATEHOUSE_CACHE = {
        "REDIS_URL": "redis://localhost:6379/0",  # the gateway's [redis]
        "CLUSTER": False,            # REDIS_URL names a Redis Cluster node
        "KEY_PREFIX": "muejam",      # the gateway's cache.key_prefix
        "TAG_HEADER": "Surrogate-Key",  # the gateway's cache.tag_header
        # How long a tag's version is kept: more than the gateway's
        # cache.l2_max_ttl (default 1 day) plus an hour.
        "VERSION_TTL": 25 * 3600,
    }

Use::

    from gatehouse_cache import cache_tags, tag_response, invalidate

    @cache_tags("story:{story_id}", "stories")
    def story_detail(request, story_id): ...

    tag_response(response, "member:7")   # on a GET: the entry's tags;
                                          # on a write: tags to invalidate
    invalidate("stories")                 # from anywhere, through Redis
    invalidate("story:7", soft=True)      # stale (revalidated), not gone

The gateway reads the tag header and never passes it on to clients.
"""

import functools
import hashlib
import json

__all__ = ["cache_tags", "tag_response", "invalidate"]

# The gateway's invalidation script, as it runs it (src/cache/l2.rs).
_BUMP = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], tonumber(t[1]) * 1000000 + tonumber(t[2]))
end
local gen = redis.call('INCR', KEYS[1])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], gen, 'PX', ARGV[1])
end
redis.call('PUBLISH', ARGV[2], gen .. ' ' .. ARGV[3])
return gen
"""

_DEFAULTS = {
    "REDIS_URL": "redis://localhost:6379/0",
    "CLUSTER": False,
    "KEY_PREFIX": "muejam",
    "TAG_HEADER": "Surrogate-Key",
    "VERSION_TTL": 25 * 3600,
}


def _settings():
    from django.conf import settings

    return {**_DEFAULTS, **getattr(settings, "GATEHOUSE_CACHE", {})}


def _check(tag):
    if not tag or any(c.isspace() or c == "," for c in tag):
        raise ValueError(f"a cache tag has no spaces or commas: {tag!r}")
    return tag


def tag_response(response, *tags):
    """Add `tags` to the response's tag header and return the response."""
    header = _settings()["TAG_HEADER"]
    present = response.get(header, "").split()
    for tag in tags:
        if _check(tag) not in present:
            present.append(tag)
    response[header] = " ".join(present)
    return response


def cache_tags(*templates):
    """A view decorator: tag the response with `templates`, each formatted
    with the view's keyword arguments (`"story:{story_id}"`)."""

    def decorate(view):
        @functools.wraps(view)
        def wrapped(request, *args, **kwargs):
            response = view(request, *args, **kwargs)
            return tag_response(response, *(t.format(**kwargs) for t in templates))

        return wrapped

    return decorate


_client = None


def _redis():
    global _client
    if _client is None:
        import redis

        conf = _settings()
        if conf["CLUSTER"]:
            _client = redis.cluster.RedisCluster.from_url(conf["REDIS_URL"])
        else:
            _client = redis.Redis.from_url(conf["REDIS_URL"])
    return _client


def _short_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def invalidate(*tags, soft=False):
    """Make every cached response carrying any of `tags` stale in every
    gateway: gone, or with `soft=True` stale but kept for revalidation and
    stale-if-error. Returns the new generation."""
    if not tags:
        return None
    conf = _settings()
    prefix = conf["KEY_PREFIX"]
    kind = "s" if soft else "t"
    stored = [f"tag:{_check(t)}" for t in tags]
    keys = [f"{{{prefix}:c}}:gen"] + [f"{{{prefix}:c}}:{kind}:{_short_hash(t)}" for t in stored]
    message = json.dumps({"from": 0, "soft": soft, "tags": stored})
    return _redis().eval(
        _BUMP,
        len(keys),
        *keys,
        int(conf["VERSION_TTL"] * 1000),
        f"{prefix}:c:inv",
        message,
    )
