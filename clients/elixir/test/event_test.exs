defmodule SseGateway.EventTest do
  use ExUnit.Case, async: true

  alias SseGateway.Event

  test "topics, event names and keys are checked as the gateway does" do
    assert {:ok, %Event{topics: ["a", "b"], event: "message"}} =
             Event.to_topics(["a", "b", "a"], nil, 1)

    assert {:ok, _} = Event.to_topics("A-z.0_~:@", :"ok.name:1-x_y", 1)
    assert {:ok, _} = Event.to_topics(String.duplicate("t", 200), "e", 1)
    assert {:ok, _} = Event.to_topics(Enum.map(1..64, &"t#{&1}"), "e", 1)

    for bad <- [
          "",
          "a b",
          "a/b",
          "é",
          String.duplicate("t", 201),
          [],
          Enum.map(1..65, &"t#{&1}"),
          [1]
        ] do
      assert {:error, %SseGateway.Error{code: "invalid_topic"}} = Event.to_topics(bad, "e", 1),
             inspect(bad)
    end

    for bad <- ["", "reset", :reset, "a b", "a~b", String.duplicate("e", 101), 5] do
      assert {:error, %SseGateway.Error{code: "invalid_event"}} = Event.to_topics("t", bad, 1),
             inspect(bad)
    end

    assert {:ok, %Event{key: "k-1"}} = Event.to_topics("t", "e", 1, idempotency_key: "k-1")

    for bad <- ["", "a b", "é", String.duplicate("k", 256), 7] do
      assert {:error, %SseGateway.Error{code: "invalid_idempotency_key"}} =
               Event.to_topics("t", "e", 1, idempotency_key: bad)
    end
  end

  test "every event gets its own key, once, and both request forms carry it" do
    {:ok, a} = Event.to_topics("t", "e", %{"x" => 1})
    {:ok, b} = Event.to_topics("t", "e", %{"x" => 1})
    assert a.key != b.key and byte_size(a.key) == 22

    assert Event.batch_item(a) == %{
             "topics" => ["t"],
             "event" => "e",
             "data" => %{"x" => 1},
             "idempotency_key" => a.key
           }

    {:ok, r} = Event.to_route("projects/task", :task_created, %{"i" => 1})

    assert Event.request(r) ==
             {"/projects/broadcast/task", %{"event" => "task_created", "payload" => %{"i" => 1}}}

    assert Event.batch_item(r)["route"] == "projects/task"

    assert {:error, %SseGateway.Error{code: "invalid_payload"}} =
             Event.to_route("projects/task", :e, [1])
  end
end
