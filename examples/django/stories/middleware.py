from django.utils.cache import add_never_cache_headers


class RequestContextMiddleware:
    """Echo what the app saw of the gateway's forwarding headers, as a Django
    deployment does for log correlation: the request id and the client chain.

    Only when the request asks with `X-App-Echo: 1`, and such an answer is
    marked never to be cached: it holds one client's address and request id,
    which a shared cache must not hand to anyone else."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.META.get("HTTP_X_APP_ECHO") == "1":
            response["X-App-Request-ID"] = request.META.get("HTTP_X_REQUEST_ID", "")
            response["X-App-Forwarded-For"] = request.META.get("HTTP_X_FORWARDED_FOR", "")
            response["X-App-Forwarded-Proto"] = request.META.get("HTTP_X_FORWARDED_PROTO", "")
            response["X-App-Host"] = request.META.get("HTTP_HOST", "")
            add_never_cache_headers(response)
        return response
