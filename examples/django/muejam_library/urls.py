from django.urls import path

from stories import views

urlpatterns = [
    path("healthz", views.healthz),
    path("v1/stories/", views.story_list),
    path("v1/stories/<int:story_id>/", views.story_detail),
    path("v1/search/", views.search),
    path("v1/users/<int:user_id>/", views.user_detail),
    path("v1/auth/login/", views.login),
    path("v1/auth/whoami/", views.whoami),
    path("v1/blob/", views.blob),
    path("v1/db/session/", views.db_session),
]
