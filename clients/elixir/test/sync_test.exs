defmodule SseGateway.SyncTest do
  # Its own module so that it runs beside the async tests (both wait on timeouts).
  use ExUnit.Case, async: true

  alias SseGateway.TestSupport.{FaultProxy, Gateway, Helpers}

  @fast [timeout: 300, connect_timeout: 300, backoff_base: 20, backoff_max: 200]

  setup do
    gw = start_supervised!({Gateway, []})
    %{gw: gw, url: Gateway.url(gw)}
  end

  defp task_numbers(url, topic, n) do
    url
    |> Helpers.raw_events("/topics/#{topic}?last_event_id=0", n, 10_000)
    |> Enum.map(&SseGateway.JSON.decode!(&1.data)["i"])
  end

  @tag :idempotency
  test "synchronous publishes retried through faults are stored once each", %{gw: gw, url: url} do
    proxy = start_supervised!({FaultProxy, Gateway.port(gw)})
    FaultProxy.set_mode(proxy, {:faults, drop: 0.2, delay: 0.2, delay_ms: 600})
    opts = [mode: :sync, url: FaultProxy.url(proxy), retries: 20] ++ @fast

    ids =
      for i <- 1..100, do: elem({:ok, _} = SseGateway.publish("sync:t", :e, %{"i" => i}, opts), 1)

    assert length(Enum.uniq(ids)) == 100
    assert Helpers.counts(url) == %{"sync:t" => 100}
    assert task_numbers(url, "sync:t", 100) == Enum.to_list(1..100)
  end
end
