"""The example app's own tests. Gatehouse's suite runs them with Django's test
runner through `gatehouse db`: the runner creates a test database, migrates
it, runs each test in a transaction, and drops the database at the end."""
import json

from django.db import connection
from django.test import Client, TestCase, TransactionTestCase

from .models import Member, Story


class StoryApiTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        cls.author = Member.objects.create(username="ada", display_name="Ada")
        Story.objects.create(title="First", body="one", author=cls.author)

    def test_list_and_create(self):
        client = Client()
        listed = client.get("/v1/stories/").json()
        self.assertEqual(listed["count"], 1)
        created = client.post(
            "/v1/stories/",
            data=json.dumps({"title": "Second", "author_id": self.author.id}),
            content_type="application/json",
        )
        self.assertEqual(created.status_code, 201)
        self.assertEqual(Story.objects.count(), 2)

    def test_runs_in_the_test_database(self):
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            self.assertTrue(cursor.fetchone()[0].startswith("test_"))


class CommittedDataTests(TransactionTestCase):
    def test_rows_are_committed_then_flushed(self):
        Member.objects.create(username="grace", display_name="Grace")
        self.assertEqual(Member.objects.filter(username="grace").count(), 1)
