"""Load for the gateway in front of the example Django app.

Readers follow the seed's mix: three story lists for each search. Each
simulated user logs in first, as a member of the example app, so that the
gateway counts it under its own session rather than all of them under the
one address locust runs from. Writers create a story, read it back, edit it
and read the list again: every write passes through the gateway, which
invalidates the cached pages it touched.

    locust -f loadtest/locustfile.py --host http://localhost   # web UI on :8089
    loadtest/run.sh                                            # headless, CSV + HTML

Environment:
    LOCUST_MEMBERS  how many members exist (`manage.py seed_data --users N`), default 10
    LOCUST_QUERY    the search term, default "test" (the seed's)

A 429 is a failure here, not a success: a run whose answers are refusals
measures the limiter, not the stack. Log in more users (`seed_data --users`)
or raise the limits in the gateway's config for a bigger run.
"""
import os
import random

from locust import HttpUser, between, task

MEMBERS = int(os.environ.get("LOCUST_MEMBERS", "10"))
QUERY = os.environ.get("LOCUST_QUERY", "test")


class Member(HttpUser):
    """A logged-in member of the example app."""

    abstract = True

    def on_start(self):
        self.member_id = random.randint(1, MEMBERS)
        self.login()

    def login(self):
        # The session cookie Django sets is kept by the user's own client.
        with self.client.post(
            "/v1/auth/login/", json={"member_id": self.member_id}, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"login as member {self.member_id}: {response.status_code}")


class Reader(Member):
    """The seed's read mix: 3x the story list for each search."""

    weight = 9
    wait_time = between(1, 3)

    @task(3)
    def stories(self):
        self.client.get("/v1/stories/")

    @task(1)
    def search(self):
        self.client.get(f"/v1/search/?q={QUERY}", name="/v1/search/?q=[query]")

    @task(1)
    def member_page(self):
        self.client.get(f"/v1/users/{self.member_id}/", name="/v1/users/[id]/")


class Writer(Member):
    """Writes through the gateway: each one invalidates cached pages."""

    weight = 1
    wait_time = between(2, 5)

    @task(4)
    def write_story(self):
        created = self.client.post(
            "/v1/stories/",
            json={"title": f"Load {random.randrange(10**6)}", "author_id": self.member_id},
        )
        if created.status_code != 201:
            return
        story = created.json()["id"]
        path = f"/v1/stories/{story}/"
        self.client.get(path, name="/v1/stories/[id]/")
        self.client.patch(path, json={"body": "edited under load"}, name="/v1/stories/[id]/")
        self.client.get("/v1/stories/")

    @task(1)
    def login_again(self):
        # A new session: Django cycles the key, the gateway sees a new subject.
        self.login()
