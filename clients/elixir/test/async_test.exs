defmodule SseGateway.AsyncTest do
  use ExUnit.Case, async: true

  alias SseGateway.Buffer
  alias SseGateway.TestSupport.{FaultProxy, Gateway, Helpers}

  # Short timeouts and backoffs keep the suite fast; the proxy's delays are
  # longer than `timeout`, so a delayed answer is a timed-out request.
  @fast [
    timeout: 300,
    connect_timeout: 300,
    backoff_base: 20,
    backoff_max: 200,
    drain_timeout: 200
  ]

  setup do
    gw = start_supervised!({Gateway, []})
    %{gw: gw, url: Gateway.url(gw)}
  end

  defp start_buffer(url, opts \\ []) do
    name = :"buffer_#{System.unique_integer([:positive])}"
    start_supervised!({Buffer, [name: name, url: url] ++ @fast ++ opts})
    name
  end

  defp task_numbers(url, topic, n) do
    url
    |> Helpers.raw_events("/topics/#{topic}?last_event_id=0", n, 10_000)
    |> Enum.map(&SseGateway.JSON.decode!(&1.data)["i"])
  end

  @tag :idempotency
  test "1,000 asynchronous broadcasts through a proxy that drops and delays answers store exactly 1,000 events",
       %{gw: gw, url: url} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    FaultProxy.set_mode(proxy, {:faults, drop: 0.15, delay: 0.15, delay_ms: 600})
    # Small batches: about 100 requests, so both kinds of fault happen many times.
    buffer = start_buffer(FaultProxy.url(proxy), batch_size: 10)
    opts = [mode: :async, buffer: buffer]

    for i <- 1..1_000 do
      assert :ok = SseGateway.Projects.broadcast_task(:task_created, %{"i" => i}, opts)
    end

    assert Buffer.flush(buffer, 40_000) == :ok
    faults = FaultProxy.stats(proxy)
    stats = Buffer.stats(buffer)
    assert faults.dropped > 0 and faults.delayed > 0, "too few faults: #{inspect(faults)}"
    assert stats.retries > 0
    assert %{enqueued: 1_000, sent: 1_000, dropped: 0, rejected: 0, buffered: 0} = stats

    assert Helpers.counts(url) == %{"projects:all" => 1_000, "projects:tasks" => 1_000}
    assert task_numbers(url, "projects:tasks", 1_000) == Enum.to_list(1..1_000)
  end

  test "with the gateway down for a while, buffered events arrive once it is back", %{
    gw: gw,
    url: url
  } do
    buffer = start_buffer(url)
    Gateway.kill9(gw)

    for i <- 1..50,
        do: :ok = SseGateway.publish("down:topic", :e, %{"i" => i}, mode: :async, buffer: buffer)

    Process.sleep(1_500)
    assert %{buffered: 50, sent: 0} = Buffer.stats(buffer)
    assert Buffer.stats(buffer).retries >= 3

    Gateway.restart(gw)
    assert Buffer.flush(buffer, 10_000) == :ok
    assert Helpers.counts(url) == %{"down:topic" => 50}
    assert task_numbers(url, "down:topic", 50) == Enum.to_list(1..50)
  end

  test "a full buffer drops (counted, logged) with on_full: :drop", %{gw: gw} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    FaultProxy.set_mode(proxy, :refuse)
    buffer = start_buffer(FaultProxy.url(proxy), buffer_size: 5, on_full: :drop)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        results =
          for i <- 1..8,
              do: SseGateway.publish("full:t", :e, %{"i" => i}, mode: :async, buffer: buffer)

        assert Enum.take(results, 5) == List.duplicate(:ok, 5)
        assert [{:error, %SseGateway.Error{code: "buffer_full"}} | _] = Enum.drop(results, 5)
      end)

    assert log =~ "buffer full"
    assert %{enqueued: 5, dropped: 3, buffered: 5} = Buffer.stats(buffer)

    FaultProxy.set_mode(proxy, :pass)
    assert Buffer.flush(buffer, 10_000) == :ok
    assert %{sent: 5, buffered: 0} = Buffer.stats(buffer)
  end

  test "a full buffer blocks the caller with on_full: :block until there is room", %{
    gw: gw,
    url: url
  } do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    FaultProxy.set_mode(proxy, :refuse)

    buffer =
      start_buffer(FaultProxy.url(proxy), buffer_size: 2, on_full: :block, block_timeout: 5_000)

    :ok = SseGateway.publish("block:t", :e, %{"i" => 1}, mode: :async, buffer: buffer)
    :ok = SseGateway.publish("block:t", :e, %{"i" => 2}, mode: :async, buffer: buffer)

    third =
      Task.async(fn ->
        SseGateway.publish("block:t", :e, %{"i" => 3}, mode: :async, buffer: buffer)
      end)

    refute Task.yield(third, 300), "the third publish should wait for room"

    FaultProxy.set_mode(proxy, :pass)
    assert Task.await(third, 5_000) == :ok
    assert Buffer.flush(buffer, 5_000) == :ok
    assert task_numbers(url, "block:t", 3) == [1, 2, 3]

    # And it gives up after block_timeout, counted as a drop. (Cut: the
    # :httpc profile keeps connections alive through the proxy.)
    FaultProxy.set_mode(proxy, :refuse)
    FaultProxy.cut(proxy)

    small =
      start_buffer(FaultProxy.url(proxy), buffer_size: 1, on_full: :block, block_timeout: 200)

    :ok = SseGateway.publish("block:t", :e, %{}, mode: :async, buffer: small)

    assert {:error, %SseGateway.Error{code: "buffer_full"}} =
             SseGateway.publish("block:t", :e, %{}, mode: :async, buffer: small)

    assert %{dropped: 1} = Buffer.stats(small)
  end

  test "an event the gateway refuses costs only itself", %{url: url} do
    buffer = start_buffer(url)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        :ok = SseGateway.publish("ok:t", :e, %{"i" => 1}, mode: :async, buffer: buffer)
        # Valid for the client, refused by the gateway (not a UUID).
        :ok =
          SseGateway.broadcast("projects", "assignment", :a, %{"project_uuid" => "x"},
            mode: :async,
            buffer: buffer
          )

        :ok = SseGateway.publish("ok:t", :e, %{"i" => 2}, mode: :async, buffer: buffer)
        assert Buffer.flush(buffer, 5_000) == :ok
      end)

    assert log =~ "invalid_payload"
    assert %{sent: 2, rejected: 1} = Buffer.stats(buffer)
    assert task_numbers(url, "ok:t", 2) == [1, 2]
  end
end
