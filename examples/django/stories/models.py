from django.db import models


class Member(models.Model):
    username = models.CharField(max_length=64, unique=True)
    display_name = models.CharField(max_length=128)
    joined_at = models.DateTimeField(auto_now_add=True)

    def as_json(self):
        return {
            "id": self.id,
            "username": self.username,
            "display_name": self.display_name,
            "joined_at": self.joined_at.isoformat(),
        }


class Story(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField()
    author = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="stories")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]

    def as_json(self):
        return {
            "id": self.id,
            "title": self.title,
            "body": self.body,
            "author_id": self.author_id,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }
