defmodule SseGateway.TestModeTest do
  # An app's own tests: mode :test, no gateway anywhere (the url points nowhere).
  use ExUnit.Case, async: true

  import SseGateway.Test
  alias SseGateway.Projects

  @uuid "3f1c2b4a-1111-4222-8333-444455556666"
  @opts [mode: :test, url: "http://127.0.0.1:9"]

  test "publishes are captured, validated and JSON round-tripped" do
    assert {:ok, "test-" <> _} =
             SseGateway.publish(["a:b", "c"], :created, %{n: 1, at: ~D[2026-01-02]}, @opts)

    assert %{topics: ["a:b", "c"], event: "created", data: %{"n" => 1}} =
             assert_published("c", :created, %{n: 1, at: "2026-01-02"})

    refute_published("a:b")

    assert {:error, %SseGateway.Error{code: "invalid_topic"}} =
             SseGateway.publish("a b", :e, %{}, @opts)
  end

  test "broadcasts get the module's topics; a task's publishes reach its test" do
    Task.async(fn ->
      Projects.broadcast_project(
        :project_updated,
        %{"uuid" => String.upcase(@uuid), "is_template" => true},
        @opts
      )
    end)
    |> Task.await()

    p = assert_broadcast("project", :project_updated)
    assert p.topics == ["projects:all", "projects:project:" <> @uuid, "projects:templates"]
    # Each assertion takes the message it matched, as assert_received does.
    refute_published(Projects.topic_templates())

    assert {:error, %SseGateway.Error{code: "invalid_payload"}} =
             Projects.broadcast_assignment(:assignment_added, %{"project_uuid" => 5}, @opts)
  end

  test "subscribers get {:projects, event, payload} in memory" do
    assert :ok = Projects.subscribe(Projects.topic_project(@uuid), @opts)

    {:ok, _} =
      Projects.broadcast_assignment(:assignment_added, %{project_uuid: @uuid, who: "ana"}, @opts)

    assert_receive {:projects, :assignment_added, %{"project_uuid" => @uuid, "who" => "ana"}}
    Projects.unsubscribe(Projects.topic_project(@uuid))
    {:ok, _} = Projects.broadcast_assignment(:assignment_added, %{project_uuid: @uuid}, @opts)
    refute_receive {:projects, _, _}, 50
  end

  test "assert_published fails, naming what was published" do
    {:ok, _} = SseGateway.publish("x", :one, 1, @opts)

    error = assert_raise ExUnit.AssertionError, fn -> assert_published("x", :two) end
    assert error.message =~ "named :two"
    assert error.message =~ "\"one\""
  end
end
