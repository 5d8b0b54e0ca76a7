class RequestContextMiddleware:
    """Echo what the app saw of the gateway's forwarding headers, as a Django
    deployment does for log correlation: the request id and the client chain."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response["X-App-Request-ID"] = request.META.get("HTTP_X_REQUEST_ID", "")
        response["X-App-Forwarded-For"] = request.META.get("HTTP_X_FORWARDED_FOR", "")
        response["X-App-Forwarded-Proto"] = request.META.get("HTTP_X_FORWARDED_PROTO", "")
        response["X-App-Host"] = request.META.get("HTTP_HOST", "")
        return response
