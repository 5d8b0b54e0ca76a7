"""JSON views with the seed API's shape."""
import json

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt
from gatehouse_cache import cache_tags, tag_response

from .models import Member, Story

PAGE_SIZE = 20


def _json_body(request):
    try:
        data = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _bad(message, status=400):
    return JsonResponse({"error": message}, status=status)


def healthz(request):
    return JsonResponse({"status": "ok"})


@never_cache
def db_session(request):
    """What the database session is set to, read inside a transaction: the
    pooling tests check that each client keeps its own settings."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('TimeZone'), pg_backend_pid()")
        zone, pid = cursor.fetchone()
    return JsonResponse({"timezone": zone, "use_tz": settings.USE_TZ, "backend_pid": pid})


def _page(request):
    try:
        return max(1, int(request.GET.get("page", "1")))
    except ValueError:
        return 1


# Cache tags (the gateway reads them, clients never see them): a list is
# tagged `stories`, a story `story:<id>`, a member's page `member:<id>`. A
# write's response names what it changed, and the gateway invalidates it.


@csrf_exempt
@cache_tags("stories")
def story_list(request):
    if request.method in ("GET", "HEAD"):
        page = _page(request)
        start = (page - 1) * PAGE_SIZE
        stories = Story.objects.all()[start : start + PAGE_SIZE]
        return JsonResponse(
            {"page": page, "count": Story.objects.count(), "results": [s.as_json() for s in stories]}
        )
    if request.method == "POST":
        data = _json_body(request)
        if data is None or not data.get("title") or "author_id" not in data:
            return _bad("title and author_id are required")
        author = Member.objects.filter(id=data["author_id"]).first()
        if author is None:
            return _bad("unknown author")
        story = Story.objects.create(title=data["title"], body=data.get("body", ""), author=author)
        response = JsonResponse(story.as_json(), status=201)
        response["Location"] = f"/v1/stories/{story.id}/"
        return tag_response(response, f"member:{author.id}")
    return HttpResponseNotAllowed(["GET", "HEAD", "POST"])


@csrf_exempt
@cache_tags("story:{story_id}")
def story_detail(request, story_id):
    story = get_object_or_404(Story, id=story_id)
    if request.method in ("GET", "HEAD"):
        return JsonResponse(story.as_json())
    if request.method in ("PUT", "PATCH"):
        data = _json_body(request)
        if data is None:
            return _bad("body must be a JSON object")
        if request.method == "PUT" and not data.get("title"):
            return _bad("PUT needs a title")
        for field in ("title", "body"):
            if field in data:
                setattr(story, field, data[field])
        story.save()
        return tag_response(JsonResponse(story.as_json()), "stories")
    if request.method == "DELETE":
        author_id = story.author_id
        story.delete()
        return tag_response(HttpResponse(status=204), "stories", f"member:{author_id}")
    return HttpResponseNotAllowed(["GET", "HEAD", "PUT", "PATCH", "DELETE"])


def search(request):
    q = request.GET.get("q", "").strip()
    if not q:
        return _bad("q is required")
    matches = Story.objects.filter(Q(title__icontains=q) | Q(body__icontains=q))[:PAGE_SIZE]
    return JsonResponse({"q": q, "results": [s.as_json() for s in matches]})


@cache_tags("member:{user_id}")
def user_detail(request, user_id):
    member = get_object_or_404(Member, id=user_id)
    data = member.as_json()
    data["stories"] = member.stories.count()
    return JsonResponse(data)


@csrf_exempt
def login(request):
    """Start a session for a member: `{"member_id": 1}`."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    data = _json_body(request)
    member = Member.objects.filter(id=(data or {}).get("member_id")).first()
    if member is None:
        return _bad("unknown member", status=403)
    request.session.cycle_key()
    request.session["member_id"] = member.id
    return JsonResponse({"member_id": member.id})


@never_cache
def whoami(request):
    """What Django made of the request: the session it read, the scheme,
    host and path it saw, and the forwarded address."""
    return JsonResponse(
        {
            "member_id": request.session.get("member_id"),
            "session_key": request.session.session_key,
            "scheme": request.scheme,
            "host": request.get_host(),
            "path": request.path,
            "method": request.method,
            "forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
            "cookies": sorted(request.COOKIES),
        }
    )


def blob(request):
    """`size` bytes (at most 64 MiB) of a large export, for tests of large
    responses and slow readers."""
    try:
        size = min(int(request.GET.get("size", "0")), 64 * 1024 * 1024)
    except ValueError:
        return _bad("size must be a number")
    return HttpResponse(b"x" * max(size, 0), content_type="application/octet-stream")
