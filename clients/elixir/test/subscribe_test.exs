defmodule SseGateway.SubscribeTest do
  use ExUnit.Case, async: true

  alias SseGateway.Event
  alias SseGateway.TestSupport.Gateway

  setup do
    gw = start_supervised!({Gateway, []})
    %{url: Gateway.url(gw)}
  end

  test "several topics on one stream: an event to two of them comes once", %{url: url} do
    opts = [url: url, mode: :sync]
    assert :ok = SseGateway.subscribe(["multi:a", "multi:b@x~y"], opts)
    {:ok, id1} = SseGateway.publish("multi:a", :one, 1, opts)
    {:ok, id2} = SseGateway.publish(["multi:a", "multi:b@x~y"], :two, [2], opts)
    {:ok, _} = SseGateway.publish("multi:other", :three, 3, opts)
    {:ok, id4} = SseGateway.publish("multi:b@x~y", :four, %{"n" => 4}, opts)

    for {id, name, data} <- [{id1, "one", 1}, {id2, "two", [2]}, {id4, "four", %{"n" => 4}}] do
      assert_receive {:sse_gateway, :event, %Event{id: ^id, event: ^name, data: ^data}}, 2_000
    end

    refute_receive {:sse_gateway, :event, _}, 300
  end

  test "last_event_id: \"0\" replays what is retained, then goes live", %{url: url} do
    opts = [url: url, mode: :sync]
    for i <- 1..3, do: {:ok, _} = SseGateway.publish("replay:t", :e, i, opts)
    assert :ok = SseGateway.subscribe("replay:t", Keyword.put(opts, :last_event_id, "0"))
    {:ok, _} = SseGateway.publish("replay:t", :e, 4, opts)

    for i <- 1..4, do: assert_receive({:sse_gateway, :event, %Event{data: ^i}}, 2_000)
  end

  test "an unusable resume id gets a reset (unknown_id), then live", %{url: url} do
    opts = [url: url, mode: :sync]
    assert :ok = SseGateway.subscribe("unknown:t", Keyword.put(opts, :last_event_id, "nope-42"))
    assert_receive {:sse_gateway, :reset, %{reason: :unknown_id, requested: "nope-42"}}, 2_000
    {:ok, id} = SseGateway.publish("unknown:t", :e, 1, opts)
    assert_receive {:sse_gateway, :event, %Event{id: ^id}}, 2_000
  end

  test "the stream ends with its subscriber", %{url: url} do
    parent = self()

    pid =
      spawn(fn ->
        :ok = SseGateway.subscribe("owner:t", url: url)
        send(parent, :subscribed)
        Process.sleep(:infinity)
      end)

    assert_receive :subscribed, 5_000
    assert [{stream, _}] = Registry.lookup(SseGateway.Registry, {pid, ["owner:t"]})
    ref = Process.monitor(stream)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, :process, ^stream, :normal}, 2_000
  end
end
